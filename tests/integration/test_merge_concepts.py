"""Merging separately trained concept sets into one set of K/V deltas (library mode, tiny SD1.5)."""
from __future__ import annotations

import pytest
import torch

from concept_attention.concepts.merge import (_regulariser_features, _trigger_features, comfy_weight,
                                              generic_captions, merge_concept_sets)
from support.merge_errors import constraint_error, regulariser_error
from concept_attention.concepts.triggers import with_triggers
from support.synthetic_concepts import synthetic_set


def test_merge_keeps_each_sets_trigger_outputs_and_beats_summing(sd15):
    bundle = sd15.bundle
    first, second = synthetic_set(bundle, ["V1"], 1), synthetic_set(bundle, ["V2", "V3"], 2)
    merged = merge_concept_sets(bundle.model, bundle.clip, [first, second])
    assert merged.triggers == ["V1", "V2", "V3"]
    assert set(merged.kv_deltas) == set(first.kv_deltas)
    clip = with_triggers(bundle.clip, {c.trigger: c.embeddings for c in merged.concepts})
    with torch.inference_mode(False), torch.no_grad():
        regulariser = _regulariser_features(bundle.clip, generic_captions())
        inputs = [_trigger_features(clip, s) for s in (first, second)]
        for key in list(merged.kv_deltas)[:4]:
            base = comfy_weight(bundle.model, key).float()
            targets = [(c, c @ (base + s.kv_deltas[key]).T) for c, s in zip(inputs, (first, second))]
            merged_w = base + merged.kv_deltas[key]
            summed_w = base + first.kv_deltas[key] + second.kv_deltas[key]
            wanted = max(float(v.abs().max()) for _, v in targets)
            assert constraint_error(merged_w, targets) < 1e-3 * wanted
            assert constraint_error(merged_w, targets) < 0.01 * constraint_error(summed_w, targets)
            assert regulariser_error(merged_w, base, regulariser) < regulariser_error(summed_w, base, regulariser)


def test_merge_refuses_duplicate_triggers_and_single_sets(sd15):
    bundle = sd15.bundle
    a, b = synthetic_set(bundle, ["V1"], 1), synthetic_set(bundle, ["V1"], 2)
    with pytest.raises(ValueError, match="unique"):
        merge_concept_sets(bundle.model, bundle.clip, [a, b])
    with pytest.raises(ValueError, match="at least two"):
        merge_concept_sets(bundle.model, bundle.clip, [a])
