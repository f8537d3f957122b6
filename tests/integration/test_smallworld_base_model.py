"""The shipped toy-world base model: it knows its world, and DisenDiff calibration works in it.

Skipped only where ``smallworld/weights`` is missing (a checkout without the shipped weights).
"""
from __future__ import annotations

import numpy as np
import pytest

from smallworld_lab import experiment as exp
from smallworld_lab import learnability
from smallworld_lab import localisation as loc
from concept_attention.smallworld import model as toy
from smallworld_lab import quality
from concept_attention.smallworld import scenes as sw
from smallworld_lab.readout import read_scene

CALIBRATION_LAYERS = "latent/1"  # base model v2: 16x16 maps, as SD1.5's at 512 px


def _shipped_width() -> int:
    from safetensors import safe_open

    with safe_open(str(toy.WEIGHTS_DIR / toy.UNET_FILE), "pt") as f:
        return int(f.get_slice("input_blocks.0.0.weight").get_shape()[0])


# The gates of issue 17 hold for base model v2 (64 channels); the first base model (32) misses them.
# strict: should v1 pass one after all, the marker is wrong and the test says so.
V1_SHIPPED = _shipped_width() < toy.MODEL_CHANNELS
v2_gate = pytest.mark.xfail(V1_SHIPPED, strict=True, reason="base model v1 (32 channels) misses the v2 gates of issue 17")
# Five CI minutes to confirm a known miss are not spent: run once v2 is shipped (measured in docs/toy_world.md).
v2_gate_not_run_on_v1 = pytest.mark.xfail(V1_SHIPPED, run=False, reason="base model v1 misses the learnability gate")


@pytest.fixture(scope="module")
def bundle():
    return toy.load_bundle()


def test_shipped_weights_are_small():
    files = [toy.WEIGHTS_DIR / name for name in (toy.UNET_FILE, toy.CLIP_FILE, toy.VAE_FILE)]
    assert sum(f.stat().st_size for f in files) <= 32 * 2**20


def test_base_model_passes_its_quality_gate():
    report = quality.quality_gate(seeds=2)
    print(f"\n[toy-world quality gate]\n{report.table()}")
    assert report.samples == 2 * len(sw.SHAPES) * len(sw.COLOURS)
    assert report.rate("shape") >= quality.GATE, report.table()
    assert report.rate("colour") >= quality.GATE, report.table()


def test_vae_round_trip_keeps_objects_readable(bundle):
    """Encode/decode through ComfyUI's VAE class: objects keep shape and colour (measured 35/35 on
    these scenes and 40/40 on the gate's objects; before the object-weighted decoder stage cyan, purple
    and pink decoded as blue or red)."""
    import torch

    scenes = sw.reference_scenes(8) + [sw.random_scene(np.random.default_rng([5, i])) for i in range(8)]
    hits = total = 0
    with torch.inference_mode():
        for scene in scenes:
            pixels = torch.from_numpy(scene.image.astype(np.float32) / 255.0)[None]
            decoded = bundle.vae.decode(bundle.vae.encode(pixels))[0].numpy()
            found = read_scene(decoded)
            for obj in scene.objects:
                total += 1
                hits += any(r.shape == obj.shape and r.colour == obj.colour for r in found)
    print(f"\n[toy-world VAE] shape+colour readable after a round trip: {hits}/{total}")
    assert hits / total >= 0.95
    ceiling = quality.roundtrip_report()
    assert ceiling.rate("colour") >= 0.95 and ceiling.rate("shape") >= 0.95, ceiling.table()


def test_calibration_moves_attention_toward_the_right_object(bundle):
    """CI quick mode of the benchmark: DisenDiff's trigger maps separate the objects better than CD's."""
    scene = sw.reference_scenes(1)[0]
    settings = exp.ExperimentSettings()
    rows = {variant: exp.run_scene(bundle, scene, variant, settings, generate=False)
            for variant in ("DisenDiff", "Custom Diffusion")}
    print(f"\n[toy-world calibration] {rows}")
    contrast = {v: r["iou_trigger_own"] - r["iou_trigger_other"] for v, r in rows.items()}
    assert contrast["DisenDiff"] > contrast["Custom Diffusion"]


@v2_gate
def test_two_object_prompts_draw_both_objects():
    report = quality.two_object_gate(seeds=1)
    print(f"\n[toy-world two-object gate]\n{report.table()}")
    assert report.samples == len(quality.two_object_prompts())
    assert report.rate("both") >= quality.TWO_OBJECT_GATE, report.table()


@v2_gate
def test_class_words_localise_at_the_calibration_layers(bundle):
    """Held-out scenes: soft IoU near its ceiling, thresholded masks and argmax assignment."""
    report = loc.localisation_report(bundle, loc.held_out_scenes(16), seeds=1)
    gates = report.gates(CALIBRATION_LAYERS)
    print("\n[toy-world localisation] " + ", ".join(f"{k} {v:.2f} (>= {need})" for k, (v, need, _) in gates.items()))
    assert all(ok for _, _, ok in gates.values()), gates


@v2_gate_not_run_on_v1
def test_the_baseline_learns_hidden_objects_with_the_toy_world_recipe(bundle):
    """Custom Diffusion (calibration off), the default toy-world recipe, dev scenes: the learned
    object's colour (colour and pattern) is drawn where the VAE round trip keeps it readable."""
    settings = exp.ExperimentSettings()
    rows = [r for i, scene in enumerate(learnability.dev_scenes(3))
            for r in learnability.learn_scene(bundle, i, scene, settings)]
    rates = learnability.rates(rows)
    print(f"\n[toy-world learnability] {rates}")
    assert rates["colour_samples"] >= 8 and rates["colour_pattern_samples"] >= 8
    assert rates["colour"] >= learnability.COLOUR_GATE and rates["colour_pattern"] >= learnability.COLOUR_PATTERN_GATE, rates
