"""Exported concepts work in stock ComfyUI: the K/V LoRA through load_lora_for_models, the token
vectors through `embedding:NAME` in the stock tokenizer. Library mode, tiny SD1.5 and SDXL."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

from concept_attention.attention.patching import model_layers
from concept_attention.concepts.concept_file import load_concepts, save_concepts
from concept_attention.concepts.concept_set import kv_digest
from concept_attention.concepts.concept_set import (Concept, ConceptSet, architecture_fingerprint,
                                                 encoder_widths, kv_weight_shapes)
from concept_attention.concepts.export import (check_file_stem, embedding_state_dict,
                                               kv_lora_state_dict, save_embeddings, save_lora)
from devkit import tiny_models

STRENGTH = 0.7


def build_concepts(model: Any, clip: Any, seed: int = 0, n_tokens: int = 2) -> ConceptSet:
    """Random deltas for every attn2 to_k/to_v of the model and random token vectors."""
    g = torch.Generator().manual_seed(seed)
    state = model.model.state_dict()
    kv = {key: torch.randn(state[key].shape, generator=g) * 0.1
          for layer in model_layers(model) for key in layer.weight_keys}
    widths = encoder_widths(clip)
    concepts = [Concept(trigger, cls, {enc: torch.randn(n_tokens, w, generator=g) for enc, w in widths.items()})
                for trigger, cls in (("V1", "cat"), ("V2", "dog"))]
    return ConceptSet(concepts, kv, architecture_fingerprint(model, clip), {"steps": 10})


@pytest.fixture(params=tiny_models.ARCHITECTURES)
def fresh(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    """A private tiny model and CLIP (weights get patched here; the session ones stay clean)."""
    arch = request.param
    return arch, tiny_models.build_model(arch, seed=3), tiny_models.build_clip(arch, seed=3)


def patched_state(model: Any, lora: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """Apply a LoRA the stock way and return the UNet weights as sampling would see them."""
    import comfy.model_management as mm
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    mm.load_models_gpu([patched], force_patch_weights=True)
    try:
        return {k: v.detach().clone() for k, v in patched.model.state_dict().items()}
    finally:
        mm.unload_all_models()  # restores the base weights of the shared model


def stock_load(path: Path) -> dict[str, torch.Tensor]:
    """What LoraLoader / LoraLoaderModelOnly do with the file."""
    import comfy.utils

    return comfy.utils.load_torch_file(str(path), safe_load=True)


def test_fingerprint_digest_matches_the_file_check(fresh: tuple[str, Any, Any], tmp_path: Path) -> None:
    arch, model, clip = fresh
    concepts = build_concepts(model, clip)
    assert kv_digest(kv_weight_shapes(model)) == concepts.architecture["kv_digest"]
    n_layers = len(model_layers(model))
    assert concepts.architecture["kv_layers"] == n_layers and len(concepts.kv_deltas) == 2 * n_layers
    save_concepts(tmp_path / "c.safetensors", concepts)
    loaded = load_concepts(tmp_path / "c.safetensors")
    assert loaded.architecture == concepts.architecture
    assert all(torch.equal(loaded.kv_deltas[k], v) for k, v in concepts.kv_deltas.items())


def test_full_rank_lora_applies_exactly_through_stock_loader(fresh: tuple[str, Any, Any], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import comfy.lora

    arch, model, clip = fresh
    concepts = build_concepts(model, clip)
    base = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    path = tmp_path / "pets_kv.safetensors"
    errors = save_lora(path, concepts)
    assert set(errors) == {k[: -len(".weight")] for k in concepts.kv_deltas}
    assert set(errors.values()) == {0.0}
    lora = stock_load(path)
    assert set(lora) == {k[: -len(".weight")] + ".diff" for k in concepts.kv_deltas}
    assert "diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2.to_k.diff" in lora
    # Every key is one ComfyUI maps onto a UNet weight ("generic lora format").
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    assert set(patches) == set(concepts.kv_deltas)
    assert "not loaded" not in caplog.text

    after = patched_state(model, lora, STRENGTH)
    for key, delta in concepts.kv_deltas.items():
        torch.testing.assert_close(after[key], base[key] + STRENGTH * delta, rtol=0, atol=1e-6)
    changed_elsewhere = [k for k in base if k not in concepts.kv_deltas and not torch.equal(after[k], base[k])]
    assert changed_elsewhere == []
    restored = model.model.state_dict()
    assert all(torch.equal(restored[k], base[k]) for k in base)


@pytest.mark.parametrize("rank", [1, 4])
def test_low_rank_lora_applies_up_times_down(fresh: tuple[str, Any, Any], tmp_path: Path, rank: int) -> None:
    arch, model, clip = fresh
    concepts = build_concepts(model, clip)
    base = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    path = tmp_path / f"pets_kv_r{rank}.safetensors"
    errors = save_lora(path, concepts, rank=rank)
    lora = stock_load(path)
    assert len(lora) == 3 * len(concepts.kv_deltas)
    after = patched_state(model, lora, STRENGTH)
    for key, delta in concepts.kv_deltas.items():
        module = key[: -len(".weight")]
        up, down = lora[f"{module}.lora_up.weight"], lora[f"{module}.lora_down.weight"]
        assert up.shape == (delta.shape[0], rank) and down.shape == (rank, delta.shape[1])
        assert lora[f"{module}.alpha"].item() == rank  # alpha / rank = 1
        torch.testing.assert_close(after[key], base[key] + STRENGTH * (up @ down), rtol=0, atol=1e-6)
        s = torch.linalg.svdvals(delta.double())
        expected = float((s[rank:].square().sum() / s.square().sum()).sqrt())
        assert errors[module] == pytest.approx(expected, rel=1e-4)
    assert all(torch.equal(after[k], base[k]) for k in base if k not in concepts.kv_deltas)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_full_rank_svd_is_lossless_and_rank_one_error_is_predicted(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(shape, generator=g)
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    module = key[: -len(".weight")]
    concepts = ConceptSet([], {key: delta}, {"model": "SD15", "kv_layers": 1})
    state, errors = kv_lora_state_dict(concepts, rank=24)
    assert errors[module] < 1e-6
    assert state[f"{module}.lora_up.weight"].shape == (shape[0], 24)
    assert state[f"{module}.lora_down.weight"].shape == (24, shape[1])
    torch.testing.assert_close(state[f"{module}.lora_up.weight"] @ state[f"{module}.lora_down.weight"],
                               delta, rtol=0, atol=1e-5)
    state, errors = kv_lora_state_dict(concepts, rank=1000)  # capped at min(out, in)
    assert state[f"{module}.lora_up.weight"].shape == (shape[0], 24) and errors[module] < 1e-6
    state, errors = kv_lora_state_dict(concepts, rank=1)
    s = torch.linalg.svdvals(delta.double())
    expected = float((s[1:].square().sum() / s.square().sum()).sqrt())
    assert errors[module] == pytest.approx(expected, rel=1e-6)
    approx = state[f"{module}.lora_up.weight"] @ state[f"{module}.lora_down.weight"]
    measured = float(torch.linalg.matrix_norm(delta - approx) / torch.linalg.matrix_norm(delta))
    assert measured == pytest.approx(expected, rel=1e-5)
    assert state[f"{module}.alpha"].ndim == 0 and state[f"{module}.alpha"].item() == 1.0
    # The two factors share the singular value evenly (keeps float16 factors in range).
    up, down = state[f"{module}.lora_up.weight"], state[f"{module}.lora_down.weight"]
    assert float(up.norm()) == pytest.approx(float(down.norm()), rel=1e-5)
    assert float(up.norm() * down.norm()) == pytest.approx(float(s[0]), rel=1e-5)
    state, errors = kv_lora_state_dict(concepts)
    assert set(state) == {f"{module}.diff"} and errors == {module: 0.0}
    assert torch.equal(state[f"{module}.diff"], delta)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank must be"):
            kv_lora_state_dict(concepts, rank=bad)  # type: ignore[arg-type]


def test_rank_deficient_and_zero_deltas() -> None:
    g = torch.Generator().manual_seed(6)
    low = torch.randn(32, 3, generator=g) @ torch.randn(3, 48, generator=g)  # rank 3
    k_key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    v_key = k_key.replace("to_k", "to_v")
    concepts = ConceptSet([], {k_key: low, v_key: torch.zeros(32, 48)}, {"model": "SD15", "kv_layers": 1})
    state, errors = kv_lora_state_dict(concepts, rank=3)
    assert errors[k_key[:-7]] < 1e-6 and errors[v_key[:-7]] == 0.0
    torch.testing.assert_close(state[k_key[:-7] + ".lora_up.weight"] @ state[k_key[:-7] + ".lora_down.weight"],
                               low, rtol=0, atol=1e-5)
    assert torch.count_nonzero(state[v_key[:-7] + ".lora_up.weight"]) == 0
    assert all(torch.isfinite(t).all() for t in state.values())


def test_float16_lora_halves_and_reports_its_error(tmp_path: Path) -> None:
    delta = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    concepts = ConceptSet([], {key: delta}, {"model": "SD15", "kv_layers": 1})
    errors = save_lora(tmp_path / "h.safetensors", concepts, dtype=torch.float16)
    stored = stock_load(tmp_path / "h.safetensors")[key[:-7] + ".diff"]
    assert stored.dtype == torch.float16
    assert 0 < errors[key[:-7]] < 1e-3


def token_entries(clip: Any, text: str) -> dict[str, list[Any]]:
    """The first 77-token chunk of each tokenizer, token ids or embedding vectors."""
    return {name: [entry[0] for entry in chunks[0]] for name, chunks in clip.tokenize(text).items()}


def test_embeddings_load_through_stock_embedding_syntax(fresh: tuple[str, Any, Any], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    arch, model, clip = fresh
    concepts = build_concepts(model, clip, n_tokens=2)
    folder = tmp_path / "embeddings"
    paths = save_embeddings(folder, concepts)
    assert [p.name for p in paths] == ["V1.safetensors", "V2.safetensors"]
    with safetensors.safe_open(str(paths[0]), "pt") as handle:
        assert set(handle.keys()) == ({"emb_params"} if arch == "sd15" else {"clip_l", "clip_g"})
    tokenizing_clip = tiny_models.build_clip(arch, seed=3, embedding_directory=[str(folder)])
    with caplog.at_level(logging.WARNING):
        got = token_entries(tokenizing_clip, "a photo of embedding:V1 cat")
    assert "does not exist" not in caplog.text
    plain = token_entries(tokenizing_clip, "a photo of cat")
    encoder_of = {"l": "clip_l", "g": "clip_g"}
    assert set(got) == ({"l"} if arch == "sd15" else {"l", "g"})
    for name, entries in got.items():
        vectors = concepts.concepts[0].embeddings[encoder_of[name]]
        # <start> a photo of [V1 vector 0] [V1 vector 1] cat <end> ...
        assert entries[:4] == plain[name][:4]
        assert all(isinstance(e, torch.Tensor) for e in entries[4:6])
        assert all(not isinstance(e, torch.Tensor) for e in entries[:4] + entries[6:])
        for i in range(2):
            assert torch.equal(entries[4 + i], vectors[i]), (name, i)
        assert entries[6:] == plain[name][4:-2]
    # And the stock encoder accepts them (no width mismatch drops them).
    cond = tokenizing_clip.encode_from_tokens_scheduled(tokenizing_clip.tokenize("a photo of embedding:V1 cat"))
    assert cond[0][0].shape[1] == 77


def test_embedding_layouts() -> None:
    sd15 = Concept("V1", "cat", {"clip_l": torch.ones(1, 768)})
    sdxl = Concept("V1", "cat", {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)})
    assert {k: tuple(v.shape) for k, v in embedding_state_dict(sd15).items()} == {"emb_params": (1, 768)}
    assert {k: tuple(v.shape) for k, v in embedding_state_dict(sdxl).items()} == {
        "clip_l": (2, 768), "clip_g": (2, 1280)}
    with pytest.raises(ValueError, match="only SD1.x"):
        embedding_state_dict(Concept("V1", "cat", {"clip_g": torch.ones(1, 1280)}))


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "a\\b", ".hidden", "a..b", "two words",
                                  "C:x", "con", "V1*", "x" * 201, "trail."])
def test_unsafe_trigger_names_are_refused_before_writing(tmp_path: Path, name: str) -> None:
    concepts = ConceptSet([Concept("ok", "cat", {"clip_l": torch.ones(1, 32)}),
                           Concept(name, "dog", {"clip_l": torch.ones(1, 32)})],
                          {}, {"model": "SD15", "kv_layers": 0, "encoders": {"clip_l": 32}})
    with pytest.raises(ValueError, match="cannot be used as an embedding file name"):
        save_embeddings(tmp_path / "emb", concepts)
    assert not (tmp_path / "emb").exists() or list((tmp_path / "emb").iterdir()) == []
    assert not (tmp_path / "evil.safetensors").exists()


def test_prefix_and_safe_names(tmp_path: Path) -> None:
    concepts = ConceptSet([Concept("V1", "cat", {"clip_l": torch.ones(1, 32)}),
                           Concept("sks-dog_2.v1", "dog", {"clip_l": torch.ones(1, 32)})],
                          {}, {"model": "SD15", "kv_layers": 0, "encoders": {"clip_l": 32}})
    paths = save_embeddings(tmp_path, concepts, prefix="pets_")
    assert [p.name for p in paths] == ["pets_V1.safetensors", "pets_sks-dog_2.v1.safetensors"]
    assert check_file_stem("V1") == "V1"
    with pytest.raises(ValueError, match="starts with a dot"):
        save_embeddings(tmp_path, concepts, prefix=".")
