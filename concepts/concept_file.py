"""The concept file (``models/concepts/*.safetensors``): a :class:`ConceptSet` on disk.

Safetensors only; nothing here ever unpickles. Layout:

* tensors ``kv.<weight key>`` -- one K/V delta per cross-attention ``to_k``/``to_v`` weight, e.g.
  ``kv.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight`` ([out, in]);
* tensors ``emb.<index>.<encoder key>`` -- the token vectors of concept ``index`` for one text
  encoder (``clip_l``, ``clip_g``), [n_tokens, width];
* tensors ``bank.<index>`` -- concept ``index``'s nested-attention token bank, if it has one,
  [M, context width] (the text encoders' widths together: 768 for SD1.x, 2048 for SDXL);
* header metadata (strings): ``format`` = ``concept-attention``, ``format_version``, and JSON in
  ``architecture`` (see ``architecture_fingerprint``), ``concepts`` (list of ``{trigger,
  class_phrase, index, n_tokens}`` in training order, plus ``bank_tokens`` = M for a concept with
  a bank) and ``metadata`` (training settings, ...).

Version 2 added the banks; version 1 files (no banks) load with ``bank`` None.

:func:`load_concepts` trusts nothing: sizes are checked before anything is read, the header is
validated against this schema and the tensors for finiteness, and every problem raises
:class:`ConceptFileError` naming the file and saying what to do.
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .concept_set import (ENCODER_KEYS, FORMAT_VERSION, Concept, ConceptSet, context_width, kv_digest,
                       value_problem)
from ..concepts.specs import ConceptSpec, check_specs
from .safe_files import atomic_write_safetensors, next_free_path

FORMAT_NAME = "concept-attention"
KV_PREFIX = "kv."
EMB_PREFIX = "emb."
BANK_PREFIX = "bank."
MAX_BANK_TOKENS = 4096
MAX_METADATA_BYTES = 1 << 20  # all header metadata strings together
MAX_HEADER_BYTES = 16 << 20  # the whole safetensors header: tensor table plus metadata
MAX_JSON_DEPTH = 32  # nesting of any JSON value in the header (the pack writes at most 4)
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
_ITEM_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_KV_KEY = re.compile(r"diffusion_model\.[A-Za-z0-9_.]+\.attn2\.to_[kv]\.weight")
_EMB_KEY = re.compile(r"emb\.(0|[1-9][0-9]{0,5})\.([A-Za-z0-9_]+)")
_BANK_KEY = re.compile(r"bank\.(0|[1-9][0-9]{0,5})")
_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: no valid Unicode text has one alone

ADVICE_DAMAGED = ("The file is damaged or incomplete (an interrupted copy or download?): copy it "
                  "again, or train and save the concepts again.")
ADVICE_FOREIGN = ("It is not a Concept Attention concept file: put LoRAs in models/loras and "
                  "textual-inversion embeddings in models/embeddings, and keep only files saved by "
                  "the Concept Attention nodes in models/concepts.")
ADVICE_SCHEMA = ("It was modified or written by another tool: save the concepts again with the "
                 "Concept Attention nodes.")
ADVICE_NEWER = "Update the Concept Attention node pack to read it."
ADVICE_DIVERGED = ("Training probably diverged: train again with a lower learning rate (or save "
                   "in float32 if this was a float16 file).")
ADVICE_TRIGGER = ("A trigger read from a file follows the rules of one typed in Train Concepts: train "
                  "the concepts again with a made-up trigger word such as V1.")


class ConceptFileError(ValueError):
    """A concept file that cannot be read (or concepts that cannot be saved), with advice."""


class _Problem(Exception):
    """What is wrong, and what the user should do; turned into a ConceptFileError by the caller."""

    def __init__(self, problem: str, advice: str = ADVICE_SCHEMA) -> None:
        super().__init__(problem)
        self.problem = problem
        self.advice = advice


def _load_error(path: Path, problem: _Problem) -> ConceptFileError:
    return ConceptFileError(f"Concept file '{path.name}' ({path}): {problem.problem}. {problem.advice}")


def _save_error(path: Path, problem: _Problem) -> ConceptFileError:
    return ConceptFileError(f"Cannot save concepts to '{path.name}' ({path}): {problem.problem}.")


# ---------------------------------------------------------------------------------------------
# Header metadata


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_json_value(value: Any, where: str, advice: str = ADVICE_SCHEMA) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH or text that is not valid Unicode (checked
    without recursion, so no value can exhaust the stack of what reads it later)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise _Problem(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep", advice)
        if isinstance(item, dict):
            pending += [(key, depth) for key in item] + [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            pending += [(v, depth + 1) for v in item]
        elif isinstance(item, str) and _SURROGATE.search(item):
            raise _Problem(f"{where} holds text that is not valid Unicode (a lone surrogate "
                           f"in {item[:40]!r})", advice)


def _loads(text: str | bytes, where: str, advice: str = ADVICE_SCHEMA) -> Any:
    """``json.loads`` whose every failure (a 5000-digit number, deep nesting) is a _Problem."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise _Problem(f"{where} is not valid JSON ({reason})", advice) from None
    _check_json_value(value, where, advice)
    return value


def _parse_json(meta: Mapping[str, str], name: str, kind: type) -> Any:
    if name not in meta:
        raise _Problem(f"the header has no '{name}' entry")
    value = _loads(meta[name], f"the header entry '{name}'")
    if not isinstance(value, kind):
        raise _Problem(f"the header entry '{name}' is a JSON {type(value).__name__}, "
                       f"expected a {kind.__name__}")
    return value


def _check_architecture(arch: dict[str, Any]) -> None:
    if not isinstance(arch.get("model"), str) or not arch["model"]:
        raise _Problem("the architecture has no model name")
    if not _is_int(arch.get("kv_layers")) or arch["kv_layers"] < 0:
        raise _Problem("the architecture has no valid 'kv_layers' count")
    if "kv_digest" in arch and not isinstance(arch["kv_digest"], str):
        raise _Problem("the architecture's 'kv_digest' is not a string")
    encoders = arch.get("encoders", {})
    if not isinstance(encoders, dict):
        raise _Problem("the architecture's 'encoders' is not a mapping")
    for key, width in encoders.items():
        if key not in ENCODER_KEYS:
            raise _Problem(f"the architecture names an unknown text encoder {key!r} "
                           f"(known: {', '.join(ENCODER_KEYS)})")
        if not _is_int(width) or width <= 0:
            raise _Problem(f"the architecture gives text encoder {key!r} an invalid width {width!r}")


def _check_concept_entries(entries: list[Any]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _Problem(f"concept entry {position} is not a JSON object")
        trigger = entry.get("trigger")
        if not isinstance(trigger, str) or not trigger.strip():
            raise _Problem(f"concept entry {position} has no trigger")
        if trigger in seen:
            raise _Problem(f"the trigger {trigger!r} is declared twice")
        seen.add(trigger)
        if not isinstance(entry.get("class_phrase"), str):
            raise _Problem(f"concept {trigger!r} has no class phrase")
        if entry.get("index") != position or not _is_int(entry.get("index")):
            raise _Problem(f"concept {trigger!r} has index {entry.get('index')!r} at position "
                           f"{position}; indices must be 0, 1, 2, ... in order")
        n_tokens = entry.get("n_tokens")
        if not _is_int(n_tokens) or not 1 <= n_tokens <= 75:
            raise _Problem(f"concept {trigger!r} has an invalid token count {n_tokens!r}")
        bank_tokens = entry.get("bank_tokens")
        if "bank_tokens" in entry and (not _is_int(bank_tokens)
                                       or not 1 <= bank_tokens <= MAX_BANK_TOKENS):
            raise _Problem(f"concept {trigger!r} has an invalid token-bank size {bank_tokens!r} "
                           f"(1 to {MAX_BANK_TOKENS})")
    try:
        check_specs([ConceptSpec(entry["trigger"], entry["class_phrase"]) for entry in entries])
    except ValueError as exc:
        raise _Problem(str(exc), ADVICE_TRIGGER) from None
    return entries


def _parse_metadata(meta: Any) -> dict[str, Any]:
    """Validate the header metadata; returns format_version, architecture, concepts, metadata."""
    if not meta:
        raise _Problem("the file has no Concept Attention header metadata", ADVICE_FOREIGN)
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise _Problem("the header metadata is not a map of strings", ADVICE_DAMAGED)
    _check_json_value(meta, "the header metadata")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in meta.items())
    if size > MAX_METADATA_BYTES:
        raise _Problem(f"its header metadata is {size} bytes, more than the "
                       f"{MAX_METADATA_BYTES} byte limit")
    if meta.get("format") != FORMAT_NAME:
        found = f"format {meta['format']!r}" if "format" in meta else "no 'format' entry"
        raise _Problem(f"the header has {found}, not {FORMAT_NAME!r}", ADVICE_FOREIGN)
    raw_version = meta.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,6}", raw_version) or int(raw_version) < 1:
        raise _Problem(f"the format version {raw_version!r} is not a positive whole number")
    version = int(raw_version)
    if version > FORMAT_VERSION:
        raise _Problem(f"it uses concept file format version {version}, but this version of the "
                       f"pack reads versions up to {FORMAT_VERSION}", ADVICE_NEWER)
    architecture = _parse_json(meta, "architecture", dict)
    _check_architecture(architecture)
    concepts = _check_concept_entries(_parse_json(meta, "concepts", list))
    if concepts and not architecture.get("encoders"):
        raise _Problem("it declares concepts but its architecture lists no text encoders")
    if version < 2 and any("bank_tokens" in entry for entry in concepts):
        raise _Problem(f"it declares token banks, which format version {version} does not have")
    metadata = _parse_json(meta, "metadata", dict) if "metadata" in meta else {}
    return {"format_version": version, "architecture": architecture, "concepts": concepts,
            "metadata": metadata}


# ---------------------------------------------------------------------------------------------
# Tensor table (names, dtypes, shapes): checked from the header alone


def _check_tensor_table(parsed: dict[str, Any], table: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Every key matches the schema and every declared tensor is present with the right shape."""
    architecture = parsed["architecture"]
    encoders: dict[str, int] = architecture.get("encoders", {})
    declared = {entry["index"]: entry for entry in parsed["concepts"]}
    kv_shapes: dict[str, tuple[int, ...]] = {}
    embeddings: set[tuple[int, str]] = set()
    banks: set[int] = set()
    for key, (dtype, shape) in table.items():
        if dtype not in FLOAT_DTYPES:
            raise _Problem(f"tensor {key!r} has dtype {dtype}; only floating-point tensors "
                           f"({', '.join(FLOAT_DTYPES)}) are allowed")
        if any(not _is_int(d) or d < 0 for d in shape):
            raise _Problem(f"tensor {key!r} has an invalid shape {list(shape)}", ADVICE_DAMAGED)
        if key.startswith(KV_PREFIX) and _KV_KEY.fullmatch(key[len(KV_PREFIX):]):
            if len(shape) != 2 or 0 in shape:
                raise _Problem(f"K/V delta {key!r} has shape {list(shape)}; expected a non-empty "
                               "[out, in] matrix")
            kv_shapes[key[len(KV_PREFIX):]] = tuple(shape)
            continue
        bank = _BANK_KEY.fullmatch(key)
        if bank is not None:
            banks.add(_check_bank(key, int(bank.group(1)), shape, declared, architecture))
            continue
        match = _EMB_KEY.fullmatch(key)
        if match is None:
            raise _Problem(f"tensor {key!r} does not match the schema (expected 'kv.<weight key of "
                           "an attn2 to_k/to_v>', 'emb.<index>.<clip_l|clip_g>' or 'bank.<index>')")
        index, encoder = int(match.group(1)), match.group(2)
        if index not in declared:
            raise _Problem(f"tensor {key!r} belongs to no declared concept "
                           f"(there are {len(declared)})")
        if encoder not in encoders:
            raise _Problem(f"tensor {key!r} is for text encoder {encoder!r}, which the "
                           f"architecture does not list ({', '.join(encoders) or 'none'})")
        entry = declared[index]
        expected = [entry["n_tokens"], encoders[encoder]]
        if list(shape) != expected:
            raise _Problem(f"embedding {key!r} of concept {entry['trigger']!r} has shape "
                           f"{list(shape)}; expected [n_tokens, width] = {expected} (the width of "
                           f"{encoder} is {encoders[encoder]})")
        embeddings.add((index, encoder))
    for index, entry in declared.items():
        for encoder in encoders:
            if (index, encoder) not in embeddings:
                raise _Problem(f"the embedding '{EMB_PREFIX}{index}.{encoder}' of concept "
                               f"{entry['trigger']!r} is missing")
        if "bank_tokens" in entry and index not in banks:
            raise _Problem(f"the token bank '{BANK_PREFIX}{index}' of concept {entry['trigger']!r} "
                           "is missing")
    expected_kv = 2 * architecture["kv_layers"]
    if len(kv_shapes) != expected_kv:
        raise _Problem(f"it has {len(kv_shapes)} K/V deltas but its architecture has "
                       f"{architecture['kv_layers']} cross-attention layers (2 deltas each, "
                       f"{expected_kv} in all)")
    for key, shape in kv_shapes.items():
        sibling = key[:-len("to_k.weight")] + ("to_v.weight" if key.endswith("to_k.weight")
                                                else "to_k.weight")
        if sibling not in kv_shapes:
            raise _Problem(f"the K/V delta {(KV_PREFIX + key)!r} has no partner "
                           f"{(KV_PREFIX + sibling)!r}")
    digest = architecture.get("kv_digest")
    if digest is not None and kv_shapes and kv_digest(kv_shapes) != digest:
        raise _Problem(f"the shapes of its K/V deltas do not match its architecture digest "
                       f"{digest} (got {kv_digest(kv_shapes)})")


def _check_bank(key: str, index: int, shape: tuple[int, ...], declared: Mapping[int, dict[str, Any]],
                architecture: Mapping[str, Any]) -> int:
    """A ``bank.<index>`` tensor belongs to a concept declaring ``bank_tokens`` and has its shape."""
    entry = declared.get(index)
    if entry is None:
        raise _Problem(f"tensor {key!r} belongs to no declared concept (there are {len(declared)})")
    if "bank_tokens" not in entry:
        raise _Problem(f"tensor {key!r} is a token bank but concept {entry['trigger']!r} declares "
                       "none (no 'bank_tokens')")
    expected = [entry["bank_tokens"], context_width(architecture)]
    if list(shape) != expected:
        raise _Problem(f"token bank {key!r} of concept {entry['trigger']!r} has shape {list(shape)}; "
                       f"expected [bank_tokens, context width] = {expected} (the context width is "
                       "the text encoders' widths together)")
    return index


def _check_values(key: str, tensor: torch.Tensor) -> None:
    problem = value_problem(tensor)
    if problem:
        raise _Problem(f"tensor {key!r} {problem}", ADVICE_DIVERGED)


# ---------------------------------------------------------------------------------------------
# Reading


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The safetensors header as JSON, the header length and the file size, sizes checked first."""
    if not path.exists():
        raise _Problem("no such file", "Check the name, or refresh the node so that its list is current.")
    if not path.is_file():
        raise _Problem("it is not a regular file", "Choose a .safetensors concept file.")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _Problem(f"it is only {size} bytes long, too short for a safetensors file",
                           ADVICE_DAMAGED)
        if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:4] == b"PK\x03\x04":
            raise _Problem("it is a PyTorch pickle / zip file, not safetensors (concept files are "
                           "safetensors only, and pickles are never loaded)", ADVICE_FOREIGN)
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > MAX_HEADER_BYTES or length > size - 8:
            raise _Problem(f"it is not a safetensors file (its header length {length} does not fit "
                           f"a {size} byte file with a header of at most {MAX_HEADER_BYTES} bytes)",
                           ADVICE_DAMAGED)
        raw = handle.read(length)
    try:
        # ValueError: also a number too long to read; RecursionError: nesting too deep.
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Problem("it is not a safetensors file (its header is not JSON)", ADVICE_DAMAGED) from None
    _check_json_value(header, "its header", ADVICE_DAMAGED)
    if not isinstance(header, dict):
        raise _Problem("it is not a safetensors file (its header is not a JSON object)", ADVICE_DAMAGED)
    return header, length, size


def _tensor_table(header: dict[str, Any], length: int, size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    table = {}
    spans: list[tuple[int, int, str]] = []
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise _Problem(f"the header entry of tensor {key!r} is malformed", ADVICE_DAMAGED) from None
        if not isinstance(dtype, str) or not _is_int(start) or not _is_int(stop):
            raise _Problem(f"the header entry of tensor {key!r} is malformed", ADVICE_DAMAGED)
        table[key] = (dtype, shape)
        spans.append((start, stop, key))
        if dtype in FLOAT_DTYPES and all(_is_int(d) and d >= 0 for d in shape):
            needed = _ITEM_BYTES[dtype]
            for d in shape:
                needed *= d
            if stop - start != needed:
                raise _Problem(f"its header is inconsistent: tensor {key!r} ({dtype} {list(shape)}) "
                               f"needs {needed} bytes but is given {stop - start}", ADVICE_DAMAGED)
    for start, stop, key in sorted(spans):
        if start != end or stop < start:
            raise _Problem(f"its header is inconsistent: the data of tensor {key!r} does not "
                           "follow the previous tensor's", ADVICE_DAMAGED)
        end = stop
    if 8 + length + end != size:
        raise _Problem(f"it is {size} bytes but its header describes {8 + length + end} bytes "
                       "(truncated, or with extra data at the end)", ADVICE_DAMAGED)
    return table


def _inspect(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...]]]]:
    header, length, size = _read_header(path)
    parsed = _parse_metadata(header.get("__metadata__"))
    table = _tensor_table(header, length, size)
    _check_tensor_table(parsed, table)
    parsed["file_bytes"] = size
    return parsed, table


def concept_file_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a concept file holds, from its header alone (no tensor data is read).

    Returns ``path``, ``file_bytes``, ``format_version``, ``architecture``, ``concepts`` (the
    declared ``{trigger, class_phrase, index, n_tokens}`` entries), ``triggers``, ``metadata``,
    ``kv_deltas`` (count) and ``dtypes`` (the tensor dtypes used). Raises ConceptFileError.
    """
    path = Path(path)
    try:
        parsed, table = _inspect(path)
    except _Problem as problem:
        raise _load_error(path, problem) from None
    except OSError as exc:
        raise _load_error(path, _Problem(f"it cannot be read ({exc})", "Check the file's permissions.")) from None
    return {
        "path": str(path),
        "file_bytes": parsed["file_bytes"],
        "format_version": parsed["format_version"],
        "architecture": parsed["architecture"],
        "concepts": parsed["concepts"],
        "triggers": [entry["trigger"] for entry in parsed["concepts"]],
        "metadata": parsed["metadata"],
        "kv_deltas": sum(1 for key in table if key.startswith(KV_PREFIX)),
        "dtypes": sorted({dtype for dtype, _ in table.values()}),
    }


def load_concepts(path: str | os.PathLike[str], dtype: torch.dtype | None = torch.float32) -> ConceptSet:
    """Read and fully validate a concept file; tensors come back as ``dtype`` (None: as stored)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        parsed, table = _inspect(path)
        tensors: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                if set(handle.keys()) != set(table):
                    raise _Problem("its tensor list changed while it was being read", ADVICE_DAMAGED)
                for key in table:
                    tensors[key] = handle.get_tensor(key)
        except _Problem:
            raise
        except Exception as exc:  # safetensors raises its own error types (and OSError)
            raise _Problem(f"safetensors cannot read it ({type(exc).__name__}: {exc})",
                           ADVICE_DAMAGED) from None
        for key, tensor in tensors.items():
            _check_values(key, tensor)
    except _Problem as problem:
        raise _load_error(path, problem) from None
    except OSError as exc:
        raise _load_error(path, _Problem(f"it cannot be read ({exc})", "Check the file's permissions.")) from None

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if dtype is None else tensor.to(dtype)

    encoders = parsed["architecture"].get("encoders", {})
    concepts = [
        Concept(trigger=entry["trigger"], class_phrase=entry["class_phrase"],
                embeddings={encoder: convert(tensors[f"{EMB_PREFIX}{entry['index']}.{encoder}"])
                            for encoder in encoders},
                bank=convert(tensors[f"{BANK_PREFIX}{entry['index']}"]) if "bank_tokens" in entry else None)
        for entry in parsed["concepts"]
    ]
    kv_deltas = {key[len(KV_PREFIX):]: convert(tensor) for key, tensor in tensors.items()
                 if key.startswith(KV_PREFIX)}
    return ConceptSet(concepts=concepts, kv_deltas=kv_deltas, architecture=parsed["architecture"],
                      metadata=parsed["metadata"], source=path.name)


# ---------------------------------------------------------------------------------------------
# Writing


def _json(value: Any, name: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise _Problem(f"its {name} cannot be written as JSON ({exc})") from None


def concept_file_contents(concepts: ConceptSet, dtype: torch.dtype | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a concept file, validated as load_concepts would."""
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(map(str, _DTYPE_NAMES))}, not {dtype}")

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor if dtype is None else tensor.to(dtype)

    tensors: dict[str, torch.Tensor] = {}
    for key, delta in concepts.kv_deltas.items():
        tensors[KV_PREFIX + key] = convert(delta)
    entries = []
    encoders = concepts.architecture.get("encoders", {}) if isinstance(concepts.architecture, dict) else {}
    for index, concept in enumerate(concepts.concepts):
        extra = sorted(set(concept.embeddings) - set(encoders))
        if extra:
            raise _Problem(f"concept {concept.trigger!r} has embeddings for {extra}, which the "
                           f"architecture's encoders {sorted(encoders)} do not include")
        n_tokens = {int(t.shape[0]) if t.ndim == 2 else -1 for t in concept.embeddings.values()}
        if len(n_tokens) > 1 or -1 in n_tokens:
            raise _Problem(f"concept {concept.trigger!r} needs [n_tokens, width] embeddings with "
                           f"the same n_tokens for every encoder, got "
                           f"{ {k: list(t.shape) for k, t in concept.embeddings.items()} }")
        entries.append({"trigger": concept.trigger, "class_phrase": concept.class_phrase,
                        "index": index, "n_tokens": n_tokens.pop() if n_tokens else 0})
        for encoder, embedding in concept.embeddings.items():
            tensors[f"{EMB_PREFIX}{index}.{encoder}"] = convert(embedding)
        if concept.bank is not None:
            if concept.bank.ndim != 2:
                raise _Problem(f"the token bank of concept {concept.trigger!r} has shape "
                               f"{list(concept.bank.shape)}; expected [bank_tokens, context width]")
            entries[-1]["bank_tokens"] = int(concept.bank.shape[0])
            tensors[f"{BANK_PREFIX}{index}"] = convert(concept.bank)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "architecture": _json(concepts.architecture, "architecture"),
        "concepts": _json(entries, "concept list"),
        "metadata": _json(concepts.metadata, "metadata"),
    }
    parsed = _parse_metadata(metadata)
    table = {key: (_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for key, t in tensors.items()}
    _check_tensor_table(parsed, table)
    for key, tensor in tensors.items():
        _check_values(key, tensor)
    return tensors, metadata


def save_concepts(path: str | os.PathLike[str], concepts: ConceptSet,
                  dtype: torch.dtype | None = None, overwrite: bool = True) -> None:
    """Write ``concepts`` to ``path`` atomically (temp file, fsync, rename).

    Tensors are stored on the CPU, contiguous, in their own dtype (float32 from training), or
    all in ``dtype`` (e.g. ``torch.float16`` halves the file). Concepts that the loader would
    refuse are refused here, with a ConceptFileError, before anything is written. Without
    ``overwrite`` an existing file is refused (``safe_files.TargetExistsError``) and left as it is.
    """
    path = Path(path)
    try:
        tensors, metadata = concept_file_contents(concepts, dtype)
    except _Problem as problem:
        raise _save_error(path, problem) from None
    atomic_write_safetensors(path, tensors, metadata, overwrite=overwrite)


def _holds_finished_work(path: Path) -> bool:
    """Whether ``path`` is a complete concept file (a damaged or partial one is no finished work)."""
    try:
        return concept_file_info(path)["metadata"].get("complete", True) is not False
    except ConceptFileError:
        return False


def save_partial_concepts(path: str | os.PathLike[str], concepts: ConceptSet,
                          overwrite: bool = True) -> Path:
    """Save an interrupted run's concepts without ever replacing a finished file; returns the path.

    Without ``overwrite`` nothing that exists is replaced: the set goes to ``path`` if it is free,
    else to ``<stem>_partial.safetensors`` (``_partial_2``, ... if that is taken too). With
    ``overwrite`` a partial or damaged file at ``path`` (or at ``<stem>_partial``) is replaced, a
    finished one never.
    """
    path = Path(path)
    if not os.path.lexists(path):
        target = path
    elif not overwrite:
        target = next_free_path(path, "_partial")
    elif not _holds_finished_work(path):
        target = path
    else:
        target = path.with_name(f"{path.stem}_partial{path.suffix}")
        if os.path.lexists(target) and _holds_finished_work(target):
            target = next_free_path(path, "_partial")
    save_concepts(target, concepts, overwrite=overwrite)
    return target
