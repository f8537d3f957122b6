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
from typing import Any, Mapping

import torch

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
        return getattr(self.base, name)


def with_triggers(clip: Any, vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> Any:
    """A clone of ``clip`` whose tokenizer knows the given triggers (the input is not changed)."""
    clone = clip.clone()
    base = clip.tokenizer.base if isinstance(clip.tokenizer, TriggerTokenizer) else clip.tokenizer
    known = dict(clip.tokenizer.vectors) if isinstance(clip.tokenizer, TriggerTokenizer) else {}
    known.update(vectors)
    clone.tokenizer = TriggerTokenizer(base, known)
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
