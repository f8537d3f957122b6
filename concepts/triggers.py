"""Make trigger words usable in any prompt encoded with a CLIP, stock CLIPTextEncode included.

ComfyUI's tokenizer already splices textual-inversion vectors into the token stream for
``embedding:NAME``. We reuse that exact mechanism: a trigger written as a plain word is rewritten
to ``embedding:TRIGGER`` and looked up in memory before the embeddings folder. So a prompt with a
trigger encodes exactly like the same prompt with ``embedding:TRIGGER`` and the exported file —
and during training the looked-up vectors are the live parameters, so gradients reach them.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Mapping, Sequence

import torch

from ..attention.tokens import find_subsequence, flatten_tokens, locate_words, phrase_ids

SUB_TOKENIZERS = ("clip_l", "clip_g")
_EMBEDDING_PREFIX = "embedding:"


def _trigger_pattern(triggers: list[str]) -> re.Pattern[str] | None:
    if not triggers:
        return None
    names = "|".join(re.escape(t) for t in sorted(triggers, key=len, reverse=True))
    # A whole word, not already written as embedding:NAME and not part of a longer word.
    return re.compile(rf"(?<![\w:]){'(?:' + names + ')'}(?!\w)")


class TriggerTokenizer:
    """Wraps a ComfyUI tokenizer so trigger words become their learned vectors."""

    def __init__(self, base: Any, vectors: Mapping[str, Mapping[str, torch.Tensor]]):
        if isinstance(base, TriggerTokenizer):  # a CLIP that already knows triggers: merge, the new win
            vectors = {**base.vectors, **vectors}
            base = base.original
        self.original = base  # the unwrapped tokenizer: wrapping never nests, however often it is done
        self.base = copy.copy(base)
        self.vectors = dict(vectors)  # trigger -> {encoder key: [n, width]}
        self._pattern = _trigger_pattern(list(self.vectors))
        for name in SUB_TOKENIZERS:
            sub = getattr(base, name, None)
            if sub is not None:
                setattr(self.base, name, self._wrap_sub(sub))

    def _wrap_sub(self, sub: Any) -> Any:
        wrapped = copy.copy(sub)
        original = sub._try_get_embedding
        if wrapped.embedding_directory is None:
            wrapped.embedding_directory = []
        vectors = self.vectors

        def try_get_embedding(embedding_name: str) -> tuple[torch.Tensor | None, str]:
            head, _, leftover = embedding_name.strip().partition(" ")
            name = head.rstrip(",")
            if name in vectors and sub.embedding_key in vectors[name]:
                trailing = head[len(name):]
                return vectors[name][sub.embedding_key], f"{trailing} {leftover}".strip()
            return original(embedding_name)

        wrapped._try_get_embedding = try_get_embedding
        return wrapped

    def rewrite(self, text: str) -> str:
        """The prompt with each bare trigger word written as ``embedding:TRIGGER``."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: f" {_EMBEDDING_PREFIX}{m.group(0)}", text)

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> Any:
        """Tokenize like the wrapped tokenizer, after rewriting trigger words."""
        return self.base.tokenize_with_weights(self.rewrite(text), return_word_ids, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "original", "vectors", "_pattern") or name.startswith("__"):
            raise AttributeError(name)  # not set yet (copy, pickle): never recurse through self.base
        return getattr(self.base, name)


def known_words(clip: Any, words: Sequence[str]) -> list[str]:
    """The words that the CLIP's vocabulary holds whole (one token each): words it already knows."""
    return [word for word in words if len(phrase_ids(clip, word)) == 1]


def with_triggers(clip: Any, vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> Any:
    """A clone of ``clip`` whose tokenizer knows the given triggers (the input is not changed)."""
    clone = clip.clone()
    clone.tokenizer = TriggerTokenizer(clip.tokenizer, vectors)
    return clone


def trigger_positions(tokens: Mapping[str, list], vector: torch.Tensor) -> list[int]:
    """Flattened positions where the rows of ``vector`` were spliced into a token list.

    Spliced entries are views of ``vector`` (ComfyUI indexes it row by row), so they are found
    by storage identity, which no other token entry can share.
    """
    key = "l" if "l" in tokens else next(iter(tokens))
    target = vector.untyped_storage().data_ptr()
    positions = []
    for j, chunk in enumerate(tokens[key]):
        for i, entry in enumerate(chunk):
            value = entry[0]
            if torch.is_tensor(value) and value.untyped_storage().data_ptr() == target:
                positions.append(j * len(chunk) + i)
    return positions


def concept_token_groups(clip: Any, tokens: Mapping[str, list],
                         concepts: Sequence[tuple[str, str, torch.Tensor]]) -> list[list[int]]:
    """Positions of each concept's trigger, then of its class phrase after it, in one prompt.

    ``concepts`` holds (trigger, class phrase, the trigger's vector as given to the tokenizer).
    """
    stream = flatten_tokens(tokens)
    groups = []
    for trigger, class_phrase, vector in concepts:
        found = trigger_positions(tokens, vector)
        if not found:
            raise ValueError(f"trigger {trigger!r} does not occur in the tokenized prompt")
        class_ids = phrase_ids(clip, class_phrase)
        starts = [s for s in find_subsequence(stream, class_ids) if s > found[-1]]
        if not starts:
            raise ValueError(f"the prompt must name the class after the trigger: '{trigger} {class_phrase}'")
        groups += [found, list(range(starts[0], starts[0] + len(class_ids)))]
    return groups


def locate_words_and_triggers(clip: Any, prompt: str, words: Sequence[str]) -> list[list[int]]:
    """Token positions of each word or phrase in the prompt; learned triggers are found too."""
    vectors = clip.tokenizer.vectors if isinstance(clip.tokenizer, TriggerTokenizer) else {}
    plain = [w for w in words if w not in vectors]
    located = dict(zip(plain, locate_words(clip, prompt, plain))) if plain else {}
    if len(plain) < len(words):
        tokens = clip.tokenize(prompt)
        for word in words:
            if word in vectors:
                per_encoder = vectors[word]
                found = trigger_positions(tokens, per_encoder[next(iter(per_encoder))])
                if not found:
                    raise ValueError(f"the trigger {word!r} does not occur in the prompt {prompt!r}")
                located[word] = found
    return [located[w] for w in words]
