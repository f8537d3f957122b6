"""What a DisenDiff run learns, and how it is put on the run's MODEL and CLIP clones.

Per concept one token vector per text encoder (copied from a rare vocabulary row, as Custom
Diffusion does, from the class word, or the vocabulary's mean row); the cross-attention K/V weight
deltas all concepts share; and with ``token_bank`` > 0 a nested-attention token bank per concept
(``docs/method.md`` §15): ``M`` vectors in text-feature space that every cross-attention layer
projects with its own (delta-patched) ``to_k``/``to_v``, read by the trigger token.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attention.chain import AttentionHook
from ..attention.nested_hook import NestedSource
from ..attention.on_device import index_tensor
from ..attention.patching import install_hook, install_nested
from ..attention.tokens import phrase_ids
from ..concepts.concept_set import Concept, ConceptSet, architecture_fingerprint, kv_weight_shapes, token_tables
from ..concepts.specs import ConceptSpec
from ..concepts.triggers import TriggerTokenizer, concept_token_groups, trigger_positions
from .settings import TrainSettings
from .text_encoder import encode_prompts

log = logging.getLogger(__name__)

# A token bank starts at the trigger's text features plus this much seeded noise (relative to
# the features' standard deviation), so its tokens differ but nested attention starts near stock.
BANK_INIT_NOISE = 0.01
# Rare CLIP vocabulary rows DisenDiff (after Custom Diffusion) copies new tokens from: ktn, pll, ucd.
RARE_TOKEN_ROWS = (42170, 47629, 43514)


def start_vector(table: torch.Tensor, clip: Any, spec: ConceptSpec, from_last: int, init: str,
                 mean_row: torch.Tensor | None = None) -> torch.Tensor:
    """``[1, width]`` float32 start of one concept's token vector (``TrainSettings.init``); ``mean_row``:
    the table's mean row if the caller has it already (one pass over the table serves every concept)."""
    if init == "mean":  # the average row: a start that names nothing in particular
        return (table.float().mean(0, keepdim=True) if mean_row is None else mean_row).clone()
    if init == "rare" and from_last < len(RARE_TOKEN_ROWS):  # the last concept gets the first rare row
        return table[[RARE_TOKEN_ROWS[from_last]]].clone().float()
    return table[phrase_ids(clip, spec.class_phrase)[:1]].clone().float()


@dataclass(frozen=True, eq=False)
class DetachStartToken(AttentionHook):
    """Custom Diffusion's trick: no gradient through the start token's key and value."""

    chunk: int = 77

    def apply(self, q, k, v, ctx, proceed):
        keep = torch.ones(k.shape[1], 1, dtype=k.dtype, device=k.device)
        keep[:: self.chunk] = 0
        return proceed(q, k * keep + (k * (1 - keep)).detach(), v * keep + (v * (1 - keep)).detach())


class _KVDelta:
    """Weight wrapper adding a trainable delta to a frozen weight."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta if self.delta.device == weight.device else self.delta.to(weight.device)
        return weight + delta.to(weight.dtype)


def _identity(weight: torch.Tensor) -> torch.Tensor:
    return weight


def _autograd_safe(patcher: Any, module: torch.nn.Module, prefix: str, skip: set[str]) -> None:
    """Weights made under inference_mode cannot be saved for backward; have them copied per use."""
    for name, param in module.named_parameters():
        key = prefix + name
        if param.is_inference() and key not in skip:
            patcher.add_weight_wrapper(key, _identity)


@dataclass(eq=False)
class ConceptParameters:
    """The tensors a run trains, in the order the optimizer sees them, and where the banks read."""

    specs: list[ConceptSpec]
    embeddings: list[dict[str, torch.Tensor]]  # per concept: encoder key -> token vector [1, width]
    kv_deltas: dict[str, torch.Tensor]  # ModelPatcher weight key of attn2.to_k/to_v -> delta
    bank_index: torch.Tensor  # [C, micro_batch]: the row each concept's bank is read at, -1 none
    banks: list[torch.Tensor] = field(default_factory=list)  # per concept [M, width] (token_bank > 0)

    @classmethod
    def initial(cls, model: Any, clip: Any, specs: list[ConceptSpec],
                settings: TrainSettings) -> ConceptParameters:
        """Token vectors from rare vocabulary rows (or the class word, or the mean row), zero K/V
        deltas, no banks yet; each where its model computes (the K/V deltas and bank rows with the
        UNet, the token vectors with the text encoder), so no step copies them between host and device."""
        unet_device, text_device = model.load_device, clip.patcher.load_device
        tables = token_tables(clip)
        mean_rows = ({key: table.float().mean(0, keepdim=True) for key, table in tables.items()}
                     if settings.init == "mean" else {})
        embeddings = []
        for i, spec in enumerate(specs):
            vectors = {}
            for key, table in tables.items():
                vector = start_vector(table, clip, spec, len(specs) - 1 - i, settings.init,
                                      mean_rows.get(key)).to(text_device)
                vectors[key] = torch.nn.Parameter(vector, requires_grad=settings.train_embeddings)
            embeddings.append(vectors)
        kv_deltas = {key: torch.nn.Parameter(torch.zeros(shape, device=unet_device), requires_grad=settings.train_kv)
                     for key, shape in kv_weight_shapes(model).items()}
        bank_index = torch.full((len(specs), settings.micro_batch), -1, dtype=torch.long, device=unet_device)
        return cls(specs, embeddings, kv_deltas, bank_index)

    def install(self, model: Any, clip: Any, settings: TrainSettings) -> None:
        """Put the K/V deltas and trigger vectors on the clones, with gradient paths to them only."""
        for key, delta in self.kv_deltas.items():
            model.add_weight_wrapper(key, _KVDelta(delta))
        _autograd_safe(model, model.model.diffusion_model, "diffusion_model.", set(self.kv_deltas))
        _autograd_safe(clip.patcher, clip.cond_stage_model, "", set())
        clip.tokenizer = TriggerTokenizer(clip.tokenizer, {
            spec.trigger: vectors for spec, vectors in zip(self.specs, self.embeddings)})
        if settings.detach_start_token:
            install_hook(model, DetachStartToken(), "all")

    def add_banks(self, model: Any, clip: Any, caption: str, settings: TrainSettings) -> None:
        """Token banks at the triggers' text features in the caption plus seeded noise, read by
        nested attention on every layer (nothing with ``token_bank`` 0)."""
        if settings.token_bank <= 0:
            return
        with torch.no_grad():
            cond, _, token_lists = encode_prompts(clip, [caption])
            features = cond[0].detach().float().cpu()
            rows = self.trigger_rows(token_lists[0])
        generator = torch.Generator().manual_seed(settings.seed + 7919)
        for spec, row in zip(self.specs, rows):
            start = features[row]
            noise = torch.randn(settings.token_bank, start.shape[-1], generator=generator)
            bank = start[None] + BANK_INIT_NOISE * float(features.std()) * noise
            self.banks.append(torch.nn.Parameter(bank.to(self.bank_index.device)))
        log.info("token banks of %d tokens x %d for %s", settings.token_bank, features.shape[-1],
                 ", ".join(s.trigger for s in self.specs))
        sources = [NestedSource(name=spec.trigger, bank=bank, index=index)
                   for spec, bank, index in zip(self.specs, self.banks, self.bank_index)]
        install_nested(model, sources, "all")

    def trigger_rows(self, tokens: dict) -> list[int]:
        """Position of each concept's trigger (its last token) in one prompt, -1 if absent."""
        rows = []
        for vectors in self.embeddings:
            found = trigger_positions(tokens, vectors[next(iter(vectors))])
            rows.append(found[-1] if found else -1)
        return rows

    def token_groups(self, clip: Any, tokens: dict) -> list[list[int]]:
        """Positions of each concept's trigger, then its class phrase, in one prompt."""
        pairs = [(spec.trigger, spec.class_phrase, vectors[next(iter(vectors))])
                 for spec, vectors in zip(self.specs, self.embeddings)]
        return concept_token_groups(clip, tokens, pairs)

    def point_banks_at(self, token_lists: list[dict]) -> None:
        """Have each bank read at its trigger's row in each prompt of the batch (none without it)."""
        if not self.banks:
            return
        rows = tuple(zip(*(self.trigger_rows(tokens) for tokens in token_lists)))  # [C][B]
        if (len(rows), len(rows[0]) if rows else 0) != tuple(self.bank_index.shape):
            raise RuntimeError(f"token banks expect batches of {self.bank_index.shape[1]}, "
                               f"got {len(token_lists)}")
        # The nested sources hold views of bank_index; the rows come from a per-device cache.
        self.bank_index.copy_(index_tensor(rows, self.bank_index.device))

    def trainable(self) -> list[torch.Tensor]:
        """The tensors the optimizer moves: K/V deltas, token vectors, banks (those switched on)."""
        params = [d for d in self.kv_deltas.values() if d.requires_grad]
        params += [v for vectors in self.embeddings for v in vectors.values() if v.requires_grad]
        params += self.banks
        if not params:
            raise ValueError("nothing to train: both K/V deltas and embeddings are switched off")
        return params

    def optimizer(self, settings: TrainSettings) -> torch.optim.Optimizer:
        """AdamW; the token banks (if any) in a group of their own with their learning rate."""
        banks = {id(b) for b in self.banks}
        rest = [p for p in self.trainable() if id(p) not in banks]
        # One fused kernel per step on CUDA; elsewhere the multi-tensor (foreach) implementation,
        # which on the CPU gives bit for bit the per-tensor loop's values.
        fused = {"fused": True} if all(p.device.type == "cuda" for p in self.trainable()) else {"foreach": True}
        if not banks:
            return torch.optim.AdamW(rest, lr=settings.learning_rate, **fused)
        return torch.optim.AdamW([{"params": rest},
                                  {"params": list(self.banks), "lr": settings.bank_learning_rate}],
                                 lr=settings.learning_rate, **fused)

    def concept_set(self, model: Any, clip: Any, metadata: dict[str, Any]) -> ConceptSet:
        """The current values as a ConceptSet (detached copies on the CPU) for these clones' architecture."""
        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True)
        banks = [copy(b) for b in self.banks] or [None] * len(self.specs)
        concepts = [Concept(spec.trigger, spec.class_phrase, {k: copy(v) for k, v in vectors.items()}, bank)
                    for spec, vectors, bank in zip(self.specs, self.embeddings, banks)]
        return ConceptSet(concepts, {k: copy(d) for k, d in self.kv_deltas.items()},
                          architecture_fingerprint(model, clip), metadata)
