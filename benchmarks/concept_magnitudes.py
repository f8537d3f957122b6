"""How large trained concepts are against the bounds that refuse absurd ones (docs/reliability.md).

Trains two concepts on toy-world scene 0 (the demo's settings, then a learning rate 20 times
higher) and prints, for each run, the largest ratio of a K/V delta's norm to the norm of the
weight it changes, and of a token vector's norm to the longest of the CLIP's own token vectors,
beside the bounds ``concepts/concept_set.py`` refuses above. Run from the repository root (about
10 minutes on 2 CPU cores):

  .venv/bin/python benchmarks/concept_magnitudes.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))

from devkit import comfy_env  # noqa: E402

RUNS = [(5e-4, 200), (1e-2, 100)]  # (learning rate, steps): the demo's, and 20 times its rate


def largest_ratios(bundle: Any, concepts: Any) -> tuple[float, float]:
    """(max ||delta|| / ||weight|| over K/V deltas, max token-vector norm / CLIP's longest)."""
    import torch

    from concept_attention.concepts.concept_set import base_weight, encoder_widths

    kv = max(float(torch.linalg.vector_norm(delta.float()))
             / float(torch.linalg.vector_norm(base_weight(bundle.model, key).float()))
             for key, delta in concepts.kv_deltas.items())
    longest = {key: float(getattr(bundle.clip.cond_stage_model, key).transformer.get_input_embeddings()
                          .weight.float().norm(dim=1).max()) for key in encoder_widths(bundle.clip)}
    embedding = max(float(vector.float().norm(dim=-1).max()) / longest[key]
                    for concept in concepts.concepts for key, vector in concept.embeddings.items())
    return kv, embedding


def main() -> None:
    """Train each run and print its ratios."""
    comfy_env.start("cpu")
    import numpy as np
    import torch

    from concept_attention.attention.calibration import CalibrationSettings
    from concept_attention.smallworld import model as toy
    from concept_attention.smallworld import scenes
    from concept_attention.concepts.concept_set import MAX_EMBEDDING_RATIO, MAX_KV_RATIO
    from concept_attention.concepts.specs import ConceptSpec
    from concept_attention.training.loop import train_concepts
    from concept_attention.training.settings import TrainSettings

    torch.set_num_threads(1)
    bundle = toy.load_bundle()
    scene = scenes.reference_scenes(1)[0]
    image = torch.from_numpy(scene.image.astype(np.float32) / 255.0)[None]
    masks = torch.from_numpy(scene.masks.astype(np.float32))
    specs = [ConceptSpec(f"V{i + 1}", obj.shape) for i, obj in enumerate(scene.objects)]
    caption = " and ".join(f"a {s.trigger} {s.class_phrase}" for s in specs) + " on a grey background"
    print(f"bounds: K/V delta / weight <= {MAX_KV_RATIO:g}, token vector / CLIP's longest <= "
          f"{MAX_EMBEDDING_RATIO:g}")
    for learning_rate, steps in RUNS:
        start = time.time()
        settings = TrainSettings(steps=steps, learning_rate=learning_rate, resolution=128, micro_batch=2,
                                 grad_accumulation=2, calibration=CalibrationSettings(weight=0.1),
                                 map_layers="latent/2", caption=caption)
        result = train_concepts(bundle.model, bundle.clip, bundle.vae, image, specs, settings, masks=masks)
        kv, embedding = largest_ratios(bundle, result.concepts)
        print(f"learning rate {learning_rate:g}, {steps} steps ({result.stopped}): K/V delta / weight "
              f"{kv:.3f}, token vector / CLIP's longest {embedding:.3f} ({time.time() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
