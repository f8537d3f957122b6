"""Export learned concepts for use without this pack: a stock LoRA and textual-inversion files.

* The K/V deltas become a LoRA that ComfyUI's stock ``LoraLoader`` / ``LoraLoaderModelOnly``
  apply (ComfyUI 0.3.75, ``comfy/lora.py``):

  - full rank: ``<module>.diff`` holding the delta itself, applied as ``w + strength * delta``
    (``load_lora`` turns it into a ``("diff", (delta,))`` patch);
  - rank ``r``: ``<module>.lora_up.weight`` [out, r], ``<module>.lora_down.weight`` [r, in] and
    ``<module>.alpha`` = r, applied as ``w + strength * (alpha / r) * up @ down`` (``LoRAAdapter``
    in ``comfy/weight_adapter/lora.py``), i.e. scale 1.

  ``<module>`` is the weight key without ``.weight`` (``diffusion_model.input_blocks.7.1.
  transformer_blocks.0.attn2.to_k``), which ``model_lora_keys_unet`` maps to the weight itself
  ("generic lora format").
* Each concept's token vectors become ``<trigger>.safetensors`` for ``models/embeddings``, used in
  a stock CLIPTextEncode as ``embedding:<trigger>`` (``comfy/sd1_clip.py`` ``load_embed``):
  ``{"emb_params": [n, 768]}`` for SD1.x (A1111's layout; ComfyUI takes the only tensor) and
  ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` for SDXL (each tokenizer picks its own key).
* Nested-attention token banks have no stock counterpart (neither a LoRA nor an embedding can
  express a query-dependent value), so they are left out, with a warning in the log.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .concept_set import Concept, ConceptSet
from .safe_files import (NAME_ADVICE, TRIGGER_ADVICE, Writer, check_file_stem,  # noqa: F401 - re-exported
                       check_targets, safetensors_writer, write_files_atomically)

log = logging.getLogger(__name__)

WEIGHT_SUFFIX = ".weight"


def _module_name(weight_key: str) -> str:
    if not weight_key.endswith(WEIGHT_SUFFIX):
        raise ValueError(f"K/V delta key {weight_key!r} is not a weight key (no '.weight' suffix)")
    return weight_key[: -len(WEIGHT_SUFFIX)]


def _low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (Eckart-Young) of ``delta``, the singular values split evenly.

    The top singular subspace comes from the eigenvectors of the small Gram matrix (float64),
    three to four times faster than a full SVD on a CPU and as exact for the leading components;
    ``up @ down`` is the projection of ``delta`` onto that subspace.
    """
    d = delta.to(torch.float64)
    wide = d.shape[0] <= d.shape[1]
    m = d if wide else d.T  # [small, big]
    _, vectors = torch.linalg.eigh(m @ m.T)  # eigenvalues ascending
    basis = vectors.flip(1)[:, :rank]  # [small, r], orthonormal
    coefficients = basis.T @ m  # [r, big]; row i has norm sigma_i
    root = torch.linalg.vector_norm(coefficients, dim=1).sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    small_side = basis * root  # [small, r]
    big_side = coefficients / safe[:, None]  # [r, big]
    if wide:
        return small_side, big_side  # up [out, r], down [r, in]
    return big_side.T, small_side.T


def _relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    reference = delta.to(torch.float64)
    norm = torch.linalg.matrix_norm(reference)
    if norm == 0:
        return 0.0 if torch.count_nonzero(approx) == 0 else float("inf")
    return float(torch.linalg.matrix_norm(reference - approx.to(torch.float64)) / norm)


def kv_lora_state_dict(concepts: ConceptSet, rank: int | None = None,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The K/V deltas as a stock-ComfyUI LoRA state dict, and each module's relative error.

    ``rank=None``: full rank, ``<module>.diff`` keys, error 0. ``rank=r``: a truncated SVD per
    module (``r`` is capped at the matrix's smaller side); the error is
    ``||delta - up @ down||_F / ||delta||_F`` of the tensors as stored. ``dtype`` stores the
    tensors in another dtype (default: the deltas' own dtype). ``device`` is where the low-rank
    factorisation runs (default: where each delta is; a GPU is much faster than the CPU for SDXL).
    The returned tensors are on the CPU.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive whole number or None for full rank, not {rank!r}")
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for key, delta in concepts.kv_deltas.items():
        module = _module_name(key)
        delta = delta.detach().to("cpu")
        if delta.ndim != 2:
            raise ValueError(f"K/V delta {key!r} has shape {list(delta.shape)}; expected [out, in]")
        out_dtype = dtype or delta.dtype
        if rank is None:
            stored = delta.to(out_dtype).contiguous()
            state[f"{module}.diff"] = stored
            errors[module] = _relative_error(delta, stored)
            continue
        r = min(rank, *delta.shape)
        work = concepts.kv_deltas[key].detach()
        up, down = _low_rank(work.to(device) if device is not None else work, r)
        up, down = up.to("cpu", out_dtype).contiguous(), down.to("cpu", out_dtype).contiguous()
        state[f"{module}.lora_up.weight"] = up
        state[f"{module}.lora_down.weight"] = down
        state[f"{module}.alpha"] = torch.tensor(float(r))  # ComfyUI scales by alpha / rank = 1
        errors[module] = _relative_error(delta, up.to(torch.float64) @ down.to(torch.float64))
    return state, errors


def lora_file(concepts: ConceptSet, rank: int | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> tuple[Writer, dict[str, float]]:
    """The LoRA file's writer (for :func:`~.safe_files.write_files_atomically`) and the errors."""
    state, errors = kv_lora_state_dict(concepts, rank, dtype, device)
    metadata = {
        "format": "concept-attention-kv-lora",
        "rank": "full" if rank is None else str(rank),
        "triggers": json.dumps(concepts.triggers, ensure_ascii=False),
        "class_phrases": json.dumps([c.class_phrase for c in concepts.concepts], ensure_ascii=False),
        "architecture": json.dumps(concepts.architecture, ensure_ascii=False),
        "max_relative_error": repr(max(errors.values(), default=0.0)),
    }
    return safetensors_writer(state, metadata), errors


def save_lora(path: str | os.PathLike[str], concepts: ConceptSet, rank: int | None = None,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              overwrite: bool = True) -> dict[str, float]:
    """Write the K/V deltas as a LoRA file (atomically); returns the per-module relative errors."""
    writer, errors = lora_file(concepts, rank, dtype, device)
    write_files_atomically([(path, writer)], overwrite)
    return errors


def embedding_state_dict(concept: Concept) -> dict[str, torch.Tensor]:
    """A concept's token vectors in the textual-inversion layout ComfyUI's ``load_embed`` reads.

    SD1.x (CLIP-L only): ``{"emb_params": [n, width]}``; SDXL: ``{"clip_l": ..., "clip_g": ...}``.
    """
    keys = set(concept.embeddings)
    for key, tensor in concept.embeddings.items():
        if tensor.ndim != 2:
            raise ValueError(f"embedding {key!r} of {concept.trigger!r} has shape "
                             f"{list(tensor.shape)}; expected [n_tokens, width]")

    def prepared(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to("cpu").contiguous()

    if keys == {"clip_l"}:
        return {"emb_params": prepared(concept.embeddings["clip_l"])}
    if keys == {"clip_l", "clip_g"}:
        return {"clip_l": prepared(concept.embeddings["clip_l"]),
                "clip_g": prepared(concept.embeddings["clip_g"])}
    raise ValueError(f"concept {concept.trigger!r} has embeddings for {sorted(keys)}; only SD1.x "
                     "(clip_l) and SDXL (clip_l + clip_g) concepts can be exported as embeddings")


def concepts_with_banks(concepts: ConceptSet) -> list[str]:
    """Triggers of the concepts that carry a nested-attention token bank (which export drops)."""
    return [c.trigger for c in concepts.concepts if c.bank is not None]


def embedding_files(folder: str | os.PathLike[str], concepts: ConceptSet,
                    prefix: str = "") -> list[tuple[Path, Writer]]:
    """One ``<prefix><trigger>.safetensors`` target and writer per concept, every name checked.

    Token banks are not written (a warning names the concepts that had one).
    """
    dropped = concepts_with_banks(concepts)
    if dropped:
        log.warning("the nested-attention token banks of %s cannot be exported as embeddings or a "
                    "LoRA and are left out: use the concept file with this pack's nested nodes",
                    ", ".join(dropped))
    folder = Path(folder)
    files = []
    for concept in concepts.concepts:
        stem = check_file_stem(f"{prefix}{concept.trigger}")
        metadata = {"format": "concept-attention-embedding", "trigger": concept.trigger,
                    "class_phrase": concept.class_phrase,
                    "model": str(concepts.architecture.get("model", ""))}
        files.append((folder / f"{stem}.safetensors",
                      safetensors_writer(embedding_state_dict(concept), metadata)))
    return files


def save_embeddings(folder: str | os.PathLike[str], concepts: ConceptSet,
                    prefix: str = "", overwrite: bool = True) -> list[Path]:
    """Write one ``<prefix><trigger>.safetensors`` per concept into ``folder``, all or nothing.

    All names are checked before anything is written. Returns the paths in concept order.
    """
    return write_files_atomically(embedding_files(folder, concepts, prefix), overwrite)


def export_concepts(lora_path: str | os.PathLike[str], embeddings_folder: str | os.PathLike[str],
                    concepts: ConceptSet, rank: int | None = None, overwrite: bool = False,
                    device: torch.device | str | None = None, name_input: str = "name"
                    ) -> tuple[Path, list[Path], dict[str, float]]:
    """The LoRA and every embedding, all or nothing: (LoRA path, embedding paths, LoRA errors).

    Every name and target is checked before the (slow) low-rank factorisation and before anything
    is written; an existing file is refused unless ``overwrite``. ``name_input`` is the input that
    names the LoRA, for the messages.
    """
    check_file_stem(Path(lora_path).stem, f"the {name_input} (a LoRA file name)", NAME_ADVICE)
    embeddings = embedding_files(embeddings_folder, concepts)
    check_targets([lora_path, *(path for path, _ in embeddings)], overwrite, name_input)
    lora_writer, errors = lora_file(concepts, rank, device=device)
    paths = write_files_atomically([(lora_path, lora_writer), *embeddings], overwrite, name_input)
    return paths[0], paths[1:], errors
