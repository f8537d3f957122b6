"""Toy-world training pairs for the nested-attention image adapter (scripts/train_nested_adapter.py --toy-data)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from concept_attention.training.adapter_data import CAPTIONS_FILE, subject_crop
from concept_attention.smallworld.scenes import random_scene

log = logging.getLogger(__name__)


def write_smallworld_dataset(folder: str | os.PathLike[str], count: int, seed: int = 0, size: int = 64) -> Path:
    """A toy-world dataset: random scenes as targets, their first object cropped by its mask as reference."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        scene = random_scene(np.random.default_rng([seed, i]), size=size)
        subject = scene.objects[0].shape
        Image.fromarray(scene.image).save(folder / f"{i:05d}.png")
        Image.fromarray(subject_crop(scene.image, scene.masks[0])).save(folder / f"{i:05d}_crop.png")
        lines.append(json.dumps({"image": f"{i:05d}.png", "caption": scene.caption, "subject": subject,
                                 "crop": f"{i:05d}_crop.png"}))
    (folder / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.info("wrote %d toy-world training pairs to %s", count, folder)
    return folder
