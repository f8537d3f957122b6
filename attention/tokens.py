"""Find where words of a prompt sit in the text encoder's token stream.

Works on ComfyUI's tokenizer output (lists of ``(token, weight[, word id])`` per 77-token chunk)
without importing ComfyUI. Position ``i`` of chunk ``j`` is row ``j * chunk_len + i`` of the
conditioning, so positions index the ``k``/``v`` rows a cross-attention layer sees.
"""
from __future__ import annotations

from typing import Any, Sequence


def _sub_tokenizer(clip: Any) -> Any:
    tokenizer = clip.tokenizer
    for name in ("clip_l", "clip_g"):
        if hasattr(tokenizer, name):
            return getattr(tokenizer, name)
    raise ValueError(f"{type(tokenizer).__name__} is not a CLIP tokenizer (SD1.x/SDXL expected)")


def phrase_ids(clip: Any, phrase: str) -> list[int]:
    """BPE ids of a phrase as the prompt tokenizer would emit them (no start/end tokens)."""
    sub = _sub_tokenizer(clip)
    ids = sub.tokenizer(phrase)["input_ids"]
    return list(ids[sub.tokens_start:-1])


def flatten_tokens(tokens: dict) -> list[int | None]:
    """Flattened token ids of tokenizer output (``None`` where an embedding vector sits)."""
    key = "l" if "l" in tokens else next(iter(tokens))
    return [t[0] if isinstance(t[0], int) else None for chunk in tokens[key] for t in chunk]


def token_stream(clip: Any, prompt: str) -> list[int | None]:
    """Flattened token ids of a prompt (``None`` where an embedding vector sits)."""
    return flatten_tokens(clip.tokenize(prompt))


def find_subsequence(stream: Sequence[int | None], ids: Sequence[int]) -> list[int]:
    """Start positions of every occurrence of ``ids`` in ``stream``."""
    n = len(ids)
    if n == 0:
        return []
    return [i for i in range(len(stream) - n + 1) if list(stream[i:i + n]) == list(ids)]


def locate_words(clip: Any, prompt: str, words: Sequence[str]) -> list[list[int]]:
    """Token positions of the first occurrence of each word or phrase in the prompt."""
    stream = token_stream(clip, prompt)
    located = []
    for word in words:
        ids = phrase_ids(clip, word)
        starts = find_subsequence(stream, ids)
        if not ids or not starts:
            raise ValueError(f"the word {word!r} does not occur in the prompt {prompt!r}; "
                             "write it in the prompt exactly as given (case does not matter)")
        located.append(list(range(starts[0], starts[0] + len(ids))))
    return located
