"""Datasets for training a nested-attention image adapter.

A dataset is a folder with pictures and a ``captions.jsonl`` file, one JSON object per line:

    {"image": "0001.png", "caption": "a photo of a cat on a sofa", "subject": "cat",
     "crop": "0001_crop.png"}

``image`` is the training target, ``caption`` must contain the ``subject`` word (the s* slot),
and the optional ``crop`` (a tight picture of the subject) is what the image encoder sees; without
it the encoder sees the whole image, which teaches copy-paste (``docs/method.md`` §17).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


CAPTIONS_FILE = "captions.jsonl"


@dataclass(frozen=True)
class AdapterRecord:
    """One training pair: target picture, its caption and subject word, the encoder's picture."""

    image: Path
    caption: str
    subject: str
    crop: Path | None = None

    @property
    def reference(self) -> Path:
        """The picture the image encoder sees."""
        return self.crop or self.image


def read_dataset(folder: str | os.PathLike[str]) -> list[AdapterRecord]:
    """Records of ``folder/captions.jsonl`` with paths resolved and every field checked."""
    folder = Path(folder)
    index = folder / CAPTIONS_FILE
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: a dataset folder needs a {CAPTIONS_FILE} with "
                                "one JSON object per line (image, caption, subject, optional crop)")
    records = []
    for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            image, caption, subject = entry["image"], entry["caption"], entry["subject"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index}, line {number}: needs a JSON object with image, caption and "
                             f"subject ({error})") from None
        if not re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", caption):
            raise ValueError(f"{index}, line {number}: the caption {caption!r} does not contain the "
                             f"subject word {subject!r}")
        crop = folder / entry["crop"] if entry.get("crop") else None
        for path in (folder / image, crop):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{index}, line {number}: {path} does not exist")
        records.append(AdapterRecord(folder / image, caption, subject, crop))
    if not records:
        raise ValueError(f"{index} lists no training pairs")
    return records


def load_picture(path: Path, size: int | None = None) -> torch.Tensor:
    """A picture as ``[H, W, 3]`` float in [0, 1]; resized (bicubic) to a ``size`` square if given."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def subject_crop(image: np.ndarray, mask: np.ndarray, background: int = 255, margin: int = 2) -> np.ndarray:
    """The subject's bounding box (plus a margin) with everything outside its mask set to ``background``."""
    ys, xs = np.nonzero(mask)
    y0, y1 = max(0, ys.min() - margin), min(mask.shape[0], ys.max() + 1 + margin)
    x0, x1 = max(0, xs.min() - margin), min(mask.shape[1], xs.max() + 1 + margin)
    crop = np.where(mask[..., None], image, background).astype(np.uint8)
    return crop[y0:y1, x0:x1]
