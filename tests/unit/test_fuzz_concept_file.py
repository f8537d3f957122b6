"""Fuzzing (hypothesis) of the concept-file loader and its header-metadata parser.

Whatever the bytes or the header, the loader either returns a ConceptSet or raises
ConceptFileError naming the file -- never another exception, a hang, or a huge allocation. The
runs are bounded (``max_examples``, ``deadline``, derandomized, no example database) so the whole
module takes well under 30 s in CI; ``FUZZ_SCALE`` multiplies the example counts for a longer
local run (``FUZZ_SCALE=50 bash scripts/test.sh tests/unit/test_fuzz_concept_file.py``).
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concept_attention.concepts import concept_file as cf
from concept_attention.concepts.concept_file import (ConceptFileError, concept_file_contents,
                                                     concept_file_info, kv_digest, load_concepts)
from concept_attention.concepts.concept_set import Concept, ConceptSet

SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
BOUNDED = settings(max_examples=60 * SCALE, deadline=2000, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_FOLDER = Path(tempfile.mkdtemp(prefix="fuzz_concepts_"))


def _small_set() -> ConceptSet:
    """One layer, one concept: a valid file of a few hundred bytes, quick to mutate."""
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2"
    shapes = {f"{key}.to_k.weight": (4, 8), f"{key}.to_v.weight": (4, 8)}
    g = torch.Generator().manual_seed(0)
    return ConceptSet([Concept("V1", "cat", {"clip_l": torch.randn(1, 8, generator=g)})],
                      {k: torch.randn(s, generator=g) for k, s in shapes.items()},
                      {"model": "SD15", "kv_layers": 1, "kv_digest": kv_digest(shapes),
                       "encoders": {"clip_l": 8}}, {"complete": True})


VALID_TENSORS, VALID_META = concept_file_contents(_small_set())
VALID_BYTES = safetensors.torch.save(dict(VALID_TENSORS), metadata=dict(VALID_META))


def _load_bytes(data: bytes) -> None:
    """Write ``data`` as a concept file and load it: success or ConceptFileError only."""
    path = _FOLDER / "fuzz.safetensors"
    path.write_bytes(data)
    for reader in (concept_file_info, load_concepts):
        try:
            reader(path)
        except ConceptFileError as error:
            assert "fuzz.safetensors" in str(error)


@BOUNDED
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_loader(data: bytes) -> None:
    _load_bytes(data)


@BOUNDED
@given(st.data())
def test_mutated_valid_files_never_crash_the_loader(data: st.DataObject) -> None:
    raw = bytearray(VALID_BYTES)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]), label="kind")
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="at")
        if kind == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255), label="bits")
        elif kind == "truncate":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        elif raw:
            del raw[at:at + data.draw(st.integers(1, 16), label="count")]
    _load_bytes(bytes(raw))


@BOUNDED
@given(st.integers(0, 2 ** 64 - 1), st.binary(max_size=64))
def test_any_header_length_is_checked_before_reading(length: int, rest: bytes) -> None:
    _load_bytes(struct.pack("<Q", length) + rest)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
                    | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def _parse(meta: Any) -> None:
    """The metadata parser returns a dict or raises its own problem type, nothing else."""
    try:
        parsed = cf._parse_metadata(meta)
    except cf._Problem as problem:
        assert problem.problem and problem.advice
        return
    assert set(parsed) == {"format_version", "architecture", "concepts", "metadata"}


@BOUNDED
@given(st.one_of(st.none(), JSON, st.dictionaries(st.text(max_size=16), st.text(max_size=64), max_size=6)))
def test_metadata_parser_refuses_arbitrary_headers(meta: Any) -> None:
    _parse(meta)


@BOUNDED
@given(st.sampled_from(["format", "format_version", "architecture", "concepts", "metadata"]),
       st.one_of(JSON.map(lambda v: json.dumps(v, allow_nan=True)), st.text(max_size=40)))
def test_metadata_parser_with_one_field_replaced(field: str, value: str) -> None:
    meta = dict(VALID_META)
    meta[field] = value
    _parse(meta)


@BOUNDED
@given(st.sampled_from(["architecture", "concepts"]), st.data())
def test_metadata_parser_with_one_json_member_replaced(field: str, data: st.DataObject) -> None:
    meta = dict(VALID_META)
    value = json.loads(meta[field])
    target = value if isinstance(value, dict) else value[0]
    member = data.draw(st.sampled_from(sorted(target) + ["extra"]), label="member")
    target[member] = data.draw(JSON, label="value")
    meta[field] = json.dumps(value, allow_nan=True)
    _parse(meta)


@BOUNDED
@given(st.data())
def test_header_table_fuzz_through_a_real_file(data: st.DataObject) -> None:
    """Valid metadata, but tensors with fuzzed names, shapes and dtypes."""
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.int8, torch.int64, torch.bool]
    tensors = dict(VALID_TENSORS)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(sorted(tensors) + ["emb.1.clip_l", "bank.0", "kv.x", "emb.0.clip_g"]),
                        label="key")
        shape = data.draw(st.lists(st.integers(0, 9), min_size=0, max_size=3), label="shape")
        dtype = data.draw(st.sampled_from(dtypes), label="dtype")
        tensors[key] = torch.zeros(shape, dtype=dtype)
    _load_bytes(safetensors.torch.save(tensors, metadata=dict(VALID_META)))


@st.composite
def hostile_json(draw: st.DrawFn) -> str:
    """JSON text that breaks naive readers: nesting deeper than the stack, integers longer than
    Python converts (4300 digits), lone surrogates escaped in strings."""
    kind = draw(st.sampled_from(["deep list", "deep object", "long number", "surrogate", "surrogate key"]))
    if kind == "deep list":
        depth = draw(st.integers(33, 5000), label="depth")
        return "[" * depth + "]" * depth
    if kind == "deep object":
        depth = draw(st.integers(33, 5000), label="depth")
        return '{"a": ' * depth + "1" + "}" * depth
    if kind == "long number":
        return draw(st.sampled_from(["", "-"])) + "9" * draw(st.integers(4301, 8000), label="digits")
    code = draw(st.integers(0xD800, 0xDFFF), label="surrogate")
    return f'"x\\u{code:04x}"' if kind == "surrogate" else f'{{"\\u{code:04x}": 1}}'


def _with_member(field: str, member: str, fragment: str) -> str:
    """VALID_META[field] with one member (of the object, or of its first entry) set to ``fragment``."""
    value = json.loads(VALID_META[field])
    target = value if isinstance(value, dict) else value[0]
    target[member] = "@@PLACEHOLDER@@"
    return json.dumps(value).replace('"@@PLACEHOLDER@@"', fragment)


MEMBERS = [("architecture", "model"), ("architecture", "encoders"), ("concepts", "trigger"),
           ("concepts", "class_phrase"), ("concepts", "n_tokens"), ("metadata", "complete")]


@BOUNDED
@given(st.sampled_from(MEMBERS), hostile_json())
def test_hostile_json_in_the_metadata_is_refused_by_the_parser(where: tuple[str, str], fragment: str) -> None:
    meta = dict(VALID_META)
    meta[where[0]] = _with_member(*where, fragment)
    with pytest.raises(cf._Problem):
        cf._parse_metadata(meta)


@BOUNDED
@given(st.sampled_from(MEMBERS + [("header", "")]), hostile_json())
def test_hostile_json_through_a_real_file_is_a_concept_file_error(where: tuple[str, str], fragment: str) -> None:
    if where[0] == "header":  # in the safetensors header itself, beside the tensor table
        (length,) = struct.unpack("<Q", VALID_BYTES[:8])
        header = VALID_BYTES[8:8 + length].decode()[:-1] + ', "x": ' + fragment + "}"
        raw = header.encode()
        data = struct.pack("<Q", len(raw)) + raw + VALID_BYTES[8 + length:]
    else:
        meta = dict(VALID_META)
        meta[where[0]] = _with_member(*where, fragment)
        data = safetensors.torch.save(dict(VALID_TENSORS), metadata=meta)
    path = _FOLDER / "hostile.safetensors"
    path.write_bytes(data)
    for reader in (concept_file_info, load_concepts):
        with pytest.raises(ConceptFileError, match="hostile.safetensors"):
            reader(path)


def test_the_unmutated_file_loads() -> None:
    """The fuzzers start from a file that really is valid."""
    path = _FOLDER / "valid.safetensors"
    path.write_bytes(VALID_BYTES)
    assert load_concepts(path).triggers == ["V1"]
