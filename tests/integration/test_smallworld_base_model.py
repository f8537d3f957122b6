"""The shipped toy-world base model: it knows its world, and DisenDiff calibration works in it.

The gates are issue 17's (docs/toy_world.md "Base model v2"); a checkout without the shipped weights fails.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from smallworld_lab import experiment as exp
from smallworld_lab import learnability
from smallworld_lab import localisation as loc
from concept_attention.smallworld import model as toy
from smallworld_lab import quality
from concept_attention.smallworld import scenes as sw
from smallworld_lab.readout import read_scene


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


def test_two_object_prompts_draw_both_objects():
    report = quality.two_object_gate(seeds=1)
    print(f"\n[toy-world two-object gate]\n{report.table()}")
    assert report.samples == len(quality.two_object_prompts())
    assert report.rate("both") >= quality.TWO_OBJECT_GATE, report.table()


@pytest.fixture(scope="module")
def localisation_gates(bundle: Any) -> dict[str, tuple[float, float, bool]]:
    """Issue 17's localisation gates on 16 held-out scenes x 1 noise draw: (value, gate, passed)."""
    gates = loc.localisation_report(bundle, loc.held_out_scenes(16), seeds=1).gates(toy.CALIBRATION_LAYERS)
    print("\n[toy-world localisation] " + ", ".join(f"{k} {v:.2f} (>= {need})" for k, (v, need, _) in gates.items()))
    return gates


@pytest.mark.parametrize("gate", ["soft_low", "soft_uniform", "thresholded_objects"])
def test_class_words_localise_at_the_calibration_layers(localisation_gates: dict, gate: str) -> None:
    """Held-out scenes: soft IoU near its ceiling (low noise and uniform t), thresholded masks."""
    assert localisation_gates[gate][2], localisation_gates


def test_class_words_win_their_objects_pixels(localisation_gates: dict) -> None:
    """Held-out scenes: the strongest class word per object pixel is the object's own."""
    assert localisation_gates["argmax"][2], localisation_gates


@pytest.fixture(scope="module")
def learned_rates(bundle: Any) -> dict[str, float]:
    """Custom Diffusion (calibration off), the default toy-world recipe, the first objects of 3 dev scenes."""
    settings = exp.ExperimentSettings()
    rows = [r for i, scene in enumerate(learnability.dev_scenes(3))
            for r in learnability.learn_scene(bundle, i, scene, settings)]
    rates = learnability.rates(rows)
    print(f"\n[toy-world learnability] {rates}")
    return rates


def test_the_baseline_learns_hidden_objects_colour(learned_rates: dict) -> None:
    """The learned object's colour is drawn where the VAE round trip keeps it readable."""
    assert learned_rates["colour_samples"] >= 8 and learned_rates["colour_pattern_samples"] >= 8, learned_rates
    assert learned_rates["colour"] >= learnability.COLOUR_GATE, learned_rates


def test_the_baseline_learns_hidden_objects_colour_and_pattern(learned_rates: dict) -> None:
    """The learned object's colour and pattern are drawn where the round trip keeps them readable."""
    assert learned_rates["colour_pattern"] >= learnability.COLOUR_PATTERN_GATE, learned_rates
