"""The concept file format: round trip, atomic writes, and refusal of every kind of bad file."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch

from concept_attention.concepts import concept_file as cf
from concept_attention.concepts.concept_file import (ConceptFileError, concept_file_contents,
                                                     concept_file_info, kv_digest, load_concepts,
                                                     save_concepts)
from concept_attention.concepts.concept_set import FORMAT_VERSION, Concept, ConceptSet

LAYERS = ["input_blocks.1.1.transformer_blocks.0.attn2", "middle_block.1.transformer_blocks.0.attn2",
          "output_blocks.3.1.transformer_blocks.0.attn2"]


def make_set(seed: int = 0, sdxl: bool = True, n_tokens: int = 2) -> ConceptSet:
    """Three layers of K/V deltas and two concepts with CLIP-L (+ CLIP-G) vectors."""
    g = torch.Generator().manual_seed(seed)
    encoders = {"clip_l": 32, "clip_g": 48} if sdxl else {"clip_l": 32}
    shapes = {}
    for i, layer in enumerate(LAYERS):
        inner = 16 * (i + 1)
        for proj in ("to_k", "to_v"):
            shapes[f"diffusion_model.{layer}.{proj}.weight"] = (inner, sum(encoders.values()))
    kv = {key: torch.randn(shape, generator=g) for key, shape in shapes.items()}
    concepts = [
        Concept(trigger, cls, {enc: torch.randn(n_tokens, width, generator=g)
                               for enc, width in encoders.items()})
        for trigger, cls in (("V2", "dog"), ("V1", "cat"))  # not alphabetical: order must survive
    ]
    architecture = {"model": "SDXL" if sdxl else "SD15", "kv_layers": len(LAYERS),
                    "kv_digest": kv_digest(shapes), "encoders": encoders}
    metadata = {"steps": 400, "complete": True, "image_sha256": "ab" * 32,
                "settings": {"lr": 1e-5, "layers": "all", "seed": 7}, "note": "ünïcode ✓"}
    return ConceptSet(concepts, kv, architecture, metadata)


def assert_same(a: ConceptSet, b: ConceptSet) -> None:
    assert a.triggers == b.triggers
    assert [c.class_phrase for c in a.concepts] == [c.class_phrase for c in b.concepts]
    assert a.architecture == b.architecture
    assert a.metadata == b.metadata
    assert a.kv_deltas.keys() == b.kv_deltas.keys()
    for key in a.kv_deltas:
        assert torch.equal(a.kv_deltas[key], b.kv_deltas[key]), key
    for ca, cb in zip(a.concepts, b.concepts):
        assert ca.embeddings.keys() == cb.embeddings.keys()
        for enc in ca.embeddings:
            assert torch.equal(ca.embeddings[enc], cb.embeddings[enc]), (ca.trigger, enc)


@pytest.mark.parametrize("sdxl", [False, True])
def test_round_trip_is_exact(tmp_path: Path, sdxl: bool) -> None:
    original = make_set(sdxl=sdxl)
    path = tmp_path / "pets.safetensors"
    save_concepts(path, original)
    loaded = load_concepts(path)
    assert_same(original, loaded)
    assert loaded.triggers == ["V2", "V1"]
    assert all(t.dtype == torch.float32 for t in loaded.kv_deltas.values())
    assert [p.name for p in tmp_path.iterdir()] == ["pets.safetensors"]  # no temp file left


def test_file_layout_matches_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "pets.safetensors"
    save_concepts(path, make_set())
    with safetensors.safe_open(str(path), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert "kv.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight" in keys
    assert {"emb.0.clip_l", "emb.0.clip_g", "emb.1.clip_l", "emb.1.clip_g"} < keys
    assert len(keys) == 2 * len(LAYERS) + 4
    assert meta["format"] == "concept-attention" and meta["format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["concepts"]) == [
        {"trigger": "V2", "class_phrase": "dog", "index": 0, "n_tokens": 2},
        {"trigger": "V1", "class_phrase": "cat", "index": 1, "n_tokens": 2}]
    assert json.loads(meta["architecture"])["encoders"] == {"clip_l": 32, "clip_g": 48}
    assert json.loads(meta["metadata"])["steps"] == 400


def test_float16_halves_tensor_bytes(tmp_path: Path) -> None:
    original = make_set()
    save_concepts(tmp_path / "full.safetensors", original)
    save_concepts(tmp_path / "half.safetensors", original, dtype=torch.float16)
    full = load_concepts(tmp_path / "full.safetensors", dtype=None)
    half = load_concepts(tmp_path / "half.safetensors", dtype=None)

    def tensor_bytes(s: ConceptSet) -> int:
        tensors = list(s.kv_deltas.values()) + [t for c in s.concepts for t in c.embeddings.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    assert all(t.dtype == torch.float16 for t in half.kv_deltas.values())
    assert tensor_bytes(half) * 2 == tensor_bytes(full) == 4 * sum(
        t.numel() for t in list(original.kv_deltas.values())
        + [t for c in original.concepts for t in c.embeddings.values()])
    info_full = concept_file_info(tmp_path / "full.safetensors")
    info_half = concept_file_info(tmp_path / "half.safetensors")
    assert info_half["dtypes"] == ["F16"] and info_full["dtypes"] == ["F32"]

    def data_bytes(path: Path) -> int:  # file size minus the 8-byte length and the header
        (header,) = struct.unpack("<Q", path.read_bytes()[:8])
        return path.stat().st_size - 8 - header

    assert data_bytes(tmp_path / "half.safetensors") * 2 == data_bytes(tmp_path / "full.safetensors")
    assert data_bytes(tmp_path / "half.safetensors") == tensor_bytes(half)
    assert info_half["file_bytes"] < 0.55 * info_full["file_bytes"]
    # Loaded back as float32 by default, equal to the float16-rounded values.
    upcast = load_concepts(tmp_path / "half.safetensors")
    key = next(iter(original.kv_deltas))
    assert upcast.kv_deltas[key].dtype == torch.float32
    assert torch.equal(upcast.kv_deltas[key], original.kv_deltas[key].half().float())


def test_views_and_noncontiguous_tensors_are_saved(tmp_path: Path) -> None:
    original = make_set()
    big = torch.randn(10, 32)
    original.concepts[0].embeddings["clip_l"] = big[3:5]  # a view into a larger tensor
    key = next(iter(original.kv_deltas))
    original.kv_deltas[key] = original.kv_deltas[key].t().contiguous().t()  # non-contiguous
    save_concepts(tmp_path / "v.safetensors", original)
    assert_same(original, load_concepts(tmp_path / "v.safetensors"))


def test_info_reads_the_header_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pets.safetensors"
    save_concepts(path, make_set())
    monkeypatch.setattr(safetensors, "safe_open", None)  # no tensor data may be read
    info = concept_file_info(path)
    assert info["triggers"] == ["V2", "V1"]
    assert info["concepts"][1] == {"trigger": "V1", "class_phrase": "cat", "index": 1, "n_tokens": 2}
    assert info["architecture"]["model"] == "SDXL" and info["kv_deltas"] == 6
    assert info["metadata"]["complete"] is True and info["format_version"] == FORMAT_VERSION
    assert info["file_bytes"] == path.stat().st_size


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pets.safetensors"
    save_concepts(path, make_set(seed=0))
    before = path.read_bytes()
    temps: list[Path] = []

    def broken_serialise(tensors: dict[str, Any], metadata: Any = None) -> bytes:
        temps.extend(p for p in tmp_path.iterdir() if p.name != path.name)  # the writer's temp file
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", broken_serialise)
    with pytest.raises(OSError, match="disk full"):
        save_concepts(path, make_set(seed=1))
    assert temps and not temps[0].exists()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pets.safetensors"]
    monkeypatch.undo()
    assert_same(make_set(seed=0), load_concepts(path))


def test_save_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    bad = make_set()
    bad.kv_deltas[next(iter(bad.kv_deltas))][0, 0] = float("nan")
    with pytest.raises(ConceptFileError, match=r"bad\.safetensors.*NaN"):
        save_concepts(path, bad)
    unserializable = make_set()
    unserializable.metadata["when"] = object()
    with pytest.raises(ConceptFileError, match="metadata cannot be written as JSON"):
        save_concepts(path, unserializable)
    wrong_width = make_set()
    wrong_width.concepts[0].embeddings["clip_g"] = torch.zeros(2, 40)
    with pytest.raises(ConceptFileError, match=r"expected \[n_tokens, width\] = \[2, 48\]"):
        save_concepts(path, wrong_width)
    overflow = make_set()
    overflow.concepts[1].embeddings["clip_l"][0, 0] = 1e6  # beyond float16's range
    with pytest.raises(ConceptFileError, match="NaN or infinite"):
        save_concepts(path, overflow, dtype=torch.float16)
    assert not path.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Every invalid file is refused with the file's name and advice


def write_raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def valid_parts() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = concept_file_contents(make_set())
    return {k: v.clone() for k, v in tensors.items()}, dict(metadata)


def mutate(change: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        tensors, metadata = valid_parts()
        change(tensors, metadata)
        write_raw(path, tensors, metadata)
    return build


def valid_bytes() -> bytes:
    tensors, metadata = valid_parts()
    return safetensors.torch.save(tensors, metadata=metadata)


def set_meta(name: str, value: str) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    return lambda tensors, metadata: metadata.__setitem__(name, value)


def edit_json(name: str, edit: Callable[[Any], Any]) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def change(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        metadata[name] = json.dumps(edit(json.loads(metadata[name])))
    return change


KV0 = "kv.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _nan(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors["emb.1.clip_l"][1, 3] = float("nan")


def _inf(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors[KV0][0, 0] = float("inf")


def _drop_layer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    del tensors[KV0], tensors[KV0.replace("to_k", "to_v")]


def _set_value(key: str, value: float, dtype: torch.dtype | None = None):
    def change(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        tensors[key] = tensors[key].to(dtype or tensors[key].dtype)
        tensors[key][0, 0] = value
    return change


def _trigger(index: int, trigger: str):
    return edit_json("concepts", lambda c: [{**e, "trigger": trigger} if e["index"] == index else e for e in c])


def _class(index: int, phrase: str):
    return edit_json("concepts", lambda c: [{**e, "class_phrase": phrase} if e["index"] == index else e for e in c])


def edit_text(name: str, old: str, new: str) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def change(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        assert old in metadata[name]
        metadata[name] = metadata[name].replace(old, new, 1)
    return change


def raw_header(edit: Callable[[str], str]) -> Callable[[Path], None]:
    """A valid file whose header JSON text is edited (for what no writer would produce)."""
    def build(path: Path) -> None:
        data = valid_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = data[8:8 + length].decode("utf-8")
        edited = edit(header)
        assert edited != header
        raw = edited.encode("utf-8")
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])
    return build


def _torch_zip(path: Path) -> None:
    torch.save({"emb_params": torch.zeros(2, 4)}, path)


INVALID: list[tuple[str, Callable[[Path], None], str, str]] = [
    # (case, how to build the file, what the message must say, the advice it must give)
    ("missing", lambda p: None, "no such file", "Check the name"),
    ("directory", lambda p: p.mkdir(), "not a regular file", "Choose a .safetensors"),
    ("empty", lambda p: p.write_bytes(b""), "too short", "damaged or incomplete"),
    ("truncated", lambda p: p.write_bytes(valid_bytes()[:-100]), "truncated", "damaged or incomplete"),
    ("truncated header", lambda p: p.write_bytes(valid_bytes()[:300]), "header length",
     "damaged or incomplete"),
    ("extra bytes", lambda p: p.write_bytes(valid_bytes() + b"\0" * 16), "extra data",
     "damaged or incomplete"),
    ("random bytes", lambda p: p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8).numpy().tobytes()),
     "not a safetensors file", "damaged or incomplete"),
    ("header not json", lambda p: p.write_bytes(struct.pack("<Q", 8) + b"not json" + b"\0" * 8),
     "header is not JSON", "damaged or incomplete"),
    ("lying header", lambda p: p.write_bytes(valid_bytes().replace(b'"F32"', b'"F16"', 1)),
     "its header is inconsistent", "damaged or incomplete"),
    ("pickle", lambda p: p.write_bytes(pickle.dumps({"a": 1})), "pickle", "not a Concept Attention"),
    ("torch zip", _torch_zip, "pickle / zip", "not a Concept Attention"),
    ("plain safetensors", lambda p: write_raw(p, {"emb_params": torch.zeros(2, 32)}, None),
     "no Concept Attention header metadata", "models/embeddings"),
    ("other format", mutate(set_meta("format", "pt")), "format 'pt'", "not a Concept Attention"),
    ("no format", mutate(lambda t, m: m.pop("format")), "no 'format' entry", "not a Concept Attention"),
    ("newer version", mutate(set_meta("format_version", str(FORMAT_VERSION + 1))),
     f"format version {FORMAT_VERSION + 1}", "Update the Concept Attention node pack"),
    ("bad version", mutate(set_meta("format_version", "one")), "not a positive whole number",
     "save the concepts again"),
    ("metadata not json", mutate(set_meta("metadata", "{steps: 3")), "'metadata' is not valid JSON",
     "save the concepts again"),
    ("concepts not a list", mutate(set_meta("concepts", "{}")), "expected a list",
     "save the concepts again"),
    ("no architecture", mutate(lambda t, m: m.pop("architecture")), "no 'architecture' entry",
     "save the concepts again"),
    ("oversized metadata", mutate(set_meta("notes", "x" * (cf.MAX_METADATA_BYTES + 1))),
     "byte limit", "save the concepts again"),
    ("unknown key", mutate(lambda t, m: t.__setitem__("lora_unet_x.alpha", torch.ones(()))),
     "'lora_unet_x.alpha' does not match the schema", "save the concepts again"),
    ("self-attention key", mutate(lambda t, m: t.__setitem__(KV0.replace("attn2", "attn1"), t.pop(KV0))),
     "does not match the schema", "save the concepts again"),
    ("undeclared concept", mutate(lambda t, m: t.__setitem__("emb.2.clip_l", torch.zeros(2, 32))),
     "belongs to no declared concept", "save the concepts again"),
    ("missing embedding", mutate(lambda t, m: t.pop("emb.1.clip_g")),
     "'emb.1.clip_g' of concept 'V1' is missing", "save the concepts again"),
    ("wrong width", mutate(lambda t, m: t.__setitem__("emb.0.clip_l", torch.zeros(2, 33))),
     r"expected [n_tokens, width] = [2, 32]", "save the concepts again"),
    ("wrong token count", mutate(lambda t, m: t.__setitem__("emb.0.clip_g", torch.zeros(3, 48))),
     r"expected [n_tokens, width] = [2, 48]", "save the concepts again"),
    ("width vs architecture", mutate(edit_json("architecture", lambda a: {**a, "encoders": {"clip_l": 768, "clip_g": 48}})),
     "expected [n_tokens, width] = [2, 768] (the width of clip_l is 768)", "save the concepts again"),
    ("kv count", mutate(_drop_layer), "has 4 K/V deltas but its architecture has 3",
     "save the concepts again"),
    ("kv digest", mutate(lambda t, m: t.__setitem__(KV0, torch.zeros(16, 81))),
     "do not match its architecture digest", "save the concepts again"),
    ("kv rank", mutate(lambda t, m: t.__setitem__(KV0, torch.zeros(16, 80, 1))),
     "expected a non-empty [out, in] matrix", "save the concepts again"),
    ("int dtype", mutate(lambda t, m: t.__setitem__("emb.0.clip_l", torch.zeros(2, 32, dtype=torch.int32))),
     "has dtype I32; only floating-point", "save the concepts again"),
    ("duplicate trigger", mutate(edit_json("concepts", lambda c: [c[0], {**c[1], "trigger": "V2"}])),
     "declared twice", "save the concepts again"),
    ("bad index", mutate(edit_json("concepts", lambda c: [{**c[0], "index": 1}, {**c[1], "index": 0}])),
     "indices must be 0, 1, 2", "save the concepts again"),
    ("NaN", mutate(_nan), "'emb.1.clip_l' contains 1 NaN or infinite", "lower learning rate"),
    ("inf", mutate(_inf), "contains 1 NaN or infinite", "lower learning rate"),
    # Finite but absurd values (they sample black pictures): beyond MAX_ABS_VALUE.
    ("KV delta 1e30", mutate(_set_value(KV0, 1e30)), f"'{KV0}' holds values up to 1e+30",
     "lower learning rate"),
    ("KV delta -2e4", mutate(_set_value(KV0, -2e4)), "holds values up to 2e+04", "lower learning rate"),
    ("embedding 3e38", mutate(_set_value("emb.0.clip_l", 3e38)), "'emb.0.clip_l' holds values up to 3e+38",
     "lower learning rate"),
    ("embedding 65504 in float16", mutate(_set_value("emb.1.clip_g", 65504.0, torch.float16)),
     "holds values up to 6.55e+04", "lower learning rate"),
    # Triggers read from a file follow the rules of Train Concepts.
    ("trigger 'a'", mutate(_trigger(0, "a")), "trigger 'a' is a common word", "made-up trigger word"),
    ("trigger 'photo'", mutate(_trigger(1, "photo")), "trigger 'photo' is a common word", "made-up trigger word"),
    ("trigger 'CON'", mutate(_trigger(0, "CON")), "trigger 'CON' is a device name on Windows",
     "made-up trigger word"),
    ("trigger 'com1'", mutate(_trigger(1, "com1")), "device name on Windows", "made-up trigger word"),
    ("trigger with a space", mutate(_trigger(0, "V 1")), "trigger 'V 1' must be one word", "made-up trigger word"),
    ("trigger with a zero-width space", mutate(_trigger(0, "V\u200b1")), "must be one word",
     "made-up trigger word"),
    ("trigger of another class", mutate(_trigger(1, "dog")), "trigger 'dog' is also a class word",
     "made-up trigger word"),
    ("triggers equal up to case", mutate(_trigger(1, "v2")), "trigger 'v2' is used twice", "made-up trigger word"),
    ("class phrase with a bidi override", mutate(_class(0, "dog\u202e")),
     "invisible or control character (U+202E)", "made-up trigger word"),
    ("empty class phrase", mutate(_class(1, " ")), "'V1' has no class word", "made-up trigger word"),
    # Crafted JSON: deep nesting, numbers too long to read, text that is not valid Unicode.
    ("metadata nested 100000 deep", mutate(set_meta("metadata", "[" * 100000 + "]" * 100000)),
     "'metadata' is not valid JSON (it is nested too deeply)", "save the concepts again"),
    ("metadata nested 40 deep", mutate(set_meta("metadata", '{"a": ' + "[" * 40 + "]" * 40 + "}")),
     "'metadata' is nested more than 32 levels deep", "save the concepts again"),
    ("concepts nested 2000 deep", mutate(set_meta("concepts", "[" * 2000 + "]" * 2000)),
     "'concepts' is not valid JSON (it is nested too deeply)", "save the concepts again"),
    ("5000-digit number in metadata", mutate(set_meta("metadata", '{"steps": ' + "9" * 5000 + "}")),
     "'metadata' is not valid JSON (Exceeds the limit", "save the concepts again"),
    ("5000-digit token count", mutate(set_meta("concepts", '[{"trigger": "V1", "class_phrase": "cat", '
                                               '"index": 0, "n_tokens": ' + "1" * 5000 + "}]")),
     "'concepts' is not valid JSON", "save the concepts again"),
    ("5000-digit width", mutate(set_meta("architecture", '{"model": "SDXL", "kv_layers": 3, '
                                         '"encoders": {"clip_l": ' + "3" * 5000 + "}}")),
     "'architecture' is not valid JSON", "save the concepts again"),
    ("lone surrogate in a trigger", mutate(edit_text("concepts", '"V2"', '"V2\\ud800"')),
     "'concepts' holds text that is not valid Unicode", "save the concepts again"),
    ("lone surrogate in metadata", mutate(set_meta("metadata", '{"note": "\\udfff"}')),
     "'metadata' holds text that is not valid Unicode", "save the concepts again"),
    ("lone surrogate in a tensor name", raw_header(lambda h: h.replace('"emb.0.clip_l"', '"emb.0.clip_l\\ud800"')),
     "its header holds text that is not valid Unicode", "damaged or incomplete"),
    ("lone surrogate in a metadata key", raw_header(lambda h: h.replace('"format":', '"\\udc00": "x", "format":')),
     "not valid Unicode", "damaged or incomplete"),
    ("header nested 100000 deep", raw_header(lambda h: h[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}"),
     "its header is not JSON", "damaged or incomplete"),
    ("5000-digit offset in the header", raw_header(lambda h: h.replace('"data_offsets":[0,', '"data_offsets":[' + "0" * 5000 + ",", 1)),
     "its header is not JSON", "damaged or incomplete"),
]


IN_TENSOR_DATA = {"NaN", "inf", "KV delta 1e30", "KV delta -2e4", "embedding 3e38", "embedding 65504 in float16"}


@pytest.mark.parametrize("case,build,message,advice", INVALID, ids=[case[0] for case in INVALID])
def test_invalid_files_are_refused_helpfully(tmp_path: Path, case: str, build: Callable[[Path], None],
                                             message: str, advice: str) -> None:
    path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
    build(path)
    with pytest.raises(ConceptFileError) as caught:
        load_concepts(path)
    text = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert path.name in text and str(path) in text
    assert message in text, text
    assert advice in text, text
    # The header-only reader refuses the same files, except for problems inside tensor data.
    if case not in IN_TENSOR_DATA:
        with pytest.raises(ConceptFileError, match="Concept file"):
            concept_file_info(path)


def test_oversized_header_is_refused_before_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", cf.MAX_HEADER_BYTES + 1) + b"{" + b" " * 64)
    with pytest.raises(ConceptFileError, match="header length"):
        load_concepts(path)


def test_concepts_without_any_tokens_need_no_encoders(tmp_path: Path) -> None:
    only_kv = make_set()
    only_kv.concepts = []
    save_concepts(tmp_path / "kv.safetensors", only_kv)
    assert load_concepts(tmp_path / "kv.safetensors").triggers == []


def test_safetensors_errors_become_concept_file_errors(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pets.safetensors"
    save_concepts(path, make_set())

    def failing_open(*args: Any, **kwargs: Any) -> None:
        raise safetensors.SafetensorError("Error while deserializing header: InvalidOffset")

    monkeypatch.setattr(safetensors, "safe_open", failing_open)
    with pytest.raises(ConceptFileError, match=r"'pets\.safetensors'.*safetensors cannot read it "
                                               r"\(SafetensorError: .*InvalidOffset\).*damaged"):
        load_concepts(path)


# ---------------------------------------------------------------------------------------------
# Nested-attention token banks (format version 2)


def banked_set(seed: int = 0, sdxl: bool = True, m: int = 4) -> ConceptSet:
    """make_set with a token bank [m, context width] on the second concept only."""
    concepts = make_set(seed, sdxl)
    width = sum(concepts.architecture["encoders"].values())
    concepts.concepts[1].bank = torch.randn(m, width, generator=torch.Generator().manual_seed(seed + 1))
    return concepts


@pytest.mark.parametrize("sdxl", [False, True])
def test_token_banks_round_trip_exactly(tmp_path: Path, sdxl: bool) -> None:
    original = banked_set(sdxl=sdxl)
    path = tmp_path / "banked.safetensors"
    save_concepts(path, original)
    loaded = load_concepts(path)
    assert_same(original, loaded)
    assert loaded.concepts[0].bank is None
    assert torch.equal(loaded.concepts[1].bank, original.concepts[1].bank)
    assert loaded.concepts[1].bank.shape == (4, 80 if sdxl else 32)
    with safetensors.safe_open(str(path), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert "bank.1" in keys and "bank.0" not in keys
    entries = json.loads(meta["concepts"])
    assert "bank_tokens" not in entries[0] and entries[1]["bank_tokens"] == 4
    assert concept_file_info(path)["concepts"][1]["bank_tokens"] == 4
    half = tmp_path / "half.safetensors"
    save_concepts(half, original, dtype=torch.float16)
    assert torch.equal(load_concepts(half).concepts[1].bank, original.concepts[1].bank.half().float())


def test_version_1_files_without_banks_still_load(tmp_path: Path) -> None:
    tensors, metadata = valid_parts()
    metadata["format_version"] = "1"
    path = tmp_path / "old.safetensors"
    write_raw(path, tensors, metadata)
    loaded = load_concepts(path)
    assert_same(make_set(), loaded)
    assert all(c.bank is None for c in loaded.concepts)


def test_save_refuses_a_bank_of_the_wrong_width(tmp_path: Path) -> None:
    wrong = banked_set()
    wrong.concepts[1].bank = torch.zeros(4, 48)  # clip_g alone, not clip_l + clip_g
    with pytest.raises(ConceptFileError, match=r"expected \[bank_tokens, context width\] = \[4, 80\]"):
        save_concepts(tmp_path / "w.safetensors", wrong)
    flat = banked_set()
    flat.concepts[1].bank = torch.zeros(80)
    with pytest.raises(ConceptFileError, match="token bank of concept 'V1' has shape"):
        save_concepts(tmp_path / "w.safetensors", flat)
    assert list(tmp_path.iterdir()) == []


def banked_mutate(change: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        tensors, metadata = concept_file_contents(banked_set())
        tensors = {k: v.clone() for k, v in tensors.items()}
        metadata = dict(metadata)
        change(tensors, metadata)
        write_raw(path, tensors, metadata)
    return build


def _bank_nan(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors["bank.1"][2, 5] = float("nan")


BANK_INVALID: list[tuple[str, Callable[[Path], None], str]] = [
    ("bank wrong width", banked_mutate(lambda t, m: t.__setitem__("bank.1", torch.zeros(4, 81))),
     "has shape [4, 81]; expected [bank_tokens, context width] = [4, 80]"),
    ("bank wrong count", banked_mutate(lambda t, m: t.__setitem__("bank.1", torch.zeros(5, 80))),
     "expected [bank_tokens, context width] = [4, 80]"),
    ("bank missing", banked_mutate(lambda t, m: t.pop("bank.1")), "token bank 'bank.1' of concept 'V1' is missing"),
    ("bank undeclared", banked_mutate(lambda t, m: t.__setitem__("bank.0", torch.zeros(4, 80))),
     "is a token bank but concept 'V2' declares none"),
    ("bank of no concept", banked_mutate(lambda t, m: t.__setitem__("bank.5", torch.zeros(4, 80))),
     "'bank.5' belongs to no declared concept"),
    ("bank size invalid", banked_mutate(edit_json("concepts", lambda c: [c[0], {**c[1], "bank_tokens": 0}])),
     "invalid token-bank size 0"),
    ("bank in version 1", banked_mutate(set_meta("format_version", "1")),
     "declares token banks, which format version 1 does not have"),
    ("bank NaN", banked_mutate(_bank_nan), "'bank.1' contains 1 NaN or infinite"),
    ("bank 1e20", banked_mutate(_set_value("bank.1", 1e20)), "'bank.1' holds values up to 1e+20"),
    ("bank -5e4", banked_mutate(_set_value("bank.1", -5e4)), "'bank.1' holds values up to 5e+04"),
]


@pytest.mark.parametrize("case,build,message", BANK_INVALID, ids=[c[0] for c in BANK_INVALID])
def test_invalid_banks_are_refused_helpfully(tmp_path: Path, case: str, build: Callable[[Path], None],
                                             message: str) -> None:
    path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
    build(path)
    with pytest.raises(ConceptFileError) as caught:
        load_concepts(path)
    text = str(caught.value)
    assert path.name in text and message in text, text
