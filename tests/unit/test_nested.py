"""Unit tests for attention/nested.py against a literal per-query value table (docs/method.md §11, eqs. 1-3)."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from concept_attention.attention.nested import NestedKV, nested_update
from support.nested_ops import nested_attention, nested_attention_multi

F64 = torch.float64


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def reference_nested(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    subjects: List[NestedKV],
) -> torch.Tensor:
    """Literal definition: per-query value table with V[s*] replaced, outer softmax over text keys."""
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    b, h, n, d = qh.shape
    t, dv = kh.shape[2], vh.shape[-1]
    scale = d**-0.5
    bias = torch.zeros(b, 1, 1, t, dtype=q.dtype)
    table = vh[:, :, None, :, :].expand(b, h, n, t, dv).clone()  # [B, h, N, T, dv]
    for s in subjects:
        index = torch.as_tensor(s.subject_index).expand(b)
        nk = _heads(s.nested_k.expand(b, -1, -1), heads)
        nv = _heads(s.nested_v.expand(b, -1, -1), heads)
        for row in range(b):
            pos = int(index[row])
            if pos < 0:
                continue
            inner = qh[row] @ nk[row].transpose(-1, -2) * scale  # [h, N, M]
            if s.nested_mask is not None:
                keep = s.nested_mask.expand(b, -1)[row]
                if not bool(keep.any()):
                    continue
                inner = inner.masked_fill(~keep, -math.inf)
            v_star = torch.softmax(inner, dim=-1) @ nv[row]  # eq. (1): [h, N, dv]
            gate = torch.ones(n, dtype=q.dtype)
            if s.query_mask is not None:
                gate = s.query_mask.expand(b, -1)[row].to(q.dtype)
            v_s = vh[row, :, pos, :][:, None, :]
            # eq. (2) with the alpha mix (and the per-query mask on the replacement)
            table[row, :, :, pos, :] = v_s + gate[None, :, None] * s.strength * (v_star - v_s)
            bias[row, 0, 0, pos] += math.log(s.token_weight)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * scale + bias, dim=-1)  # [B, h, N, T]
    out = torch.einsum("bhnt,bhntd->bhnd", probs, table)  # eq. (3)
    return out.permute(0, 2, 1, 3).reshape(b, n, h * dv)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out by hand."""
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)
    out = probs @ vh
    return out.permute(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def _inputs(
    b: int = 3,
    n: int = 6,
    t: int = 7,
    m: int = 5,
    heads: int = 2,
    d: int = 3,
    nested_batch: Optional[int] = None,
    dtype: torch.dtype = F64,
    seed: int = 0,
    grad: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """Random projected q, k, v, nested_k, nested_v."""
    gen = torch.Generator().manual_seed(seed)
    c = heads * d
    nb = b if nested_batch is None else nested_batch

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)

    return r(b, n, c), r(b, t, c), r(b, t, c), r(nb, m, c), r(nb, m, c)


def test_matches_reference_with_all_knobs() -> None:
    q, k, v, nk, nv = _inputs()
    index = torch.tensor([2, -1, 4])
    mask = torch.tensor([[True, False, True, True, False], [True] * 5, [False, True, True, False, True]])
    out = nested_attention(q, k, v, 2, index, nk, nv, nested_mask=mask, strength=0.7, token_weight=1.8)
    subject = NestedKV(index, nk, nv, mask, strength=0.7, token_weight=1.8)
    ref = reference_nested(q, k, v, 2, [subject])
    assert out.shape == (3, 6, 6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # the nested tokens really matter: the active rows differ from plain attention
    plain = plain_attention(q, k, v, 2)
    assert (out[0] - plain[0]).abs().max() > 1e-3
    assert (out[2] - plain[2]).abs().max() > 1e-3


def test_matches_reference_defaults_and_broadcast_nested_batch() -> None:
    q, k, v, nk, nv = _inputs(b=2, nested_batch=1, seed=1)
    index = torch.tensor([0, 6])
    out = nested_attention(q, k, v, 2, index, nk, nv)
    ref = reference_nested(q, k, v, 2, [NestedKV(index, nk, nv)])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    expanded = nested_attention(q, k, v, 2, index, nk.expand(2, -1, -1), nv.expand(2, -1, -1))
    torch.testing.assert_close(out, expanded, rtol=0, atol=1e-12)


def test_gradients_match_reference() -> None:
    q, k, v, nk, nv = _inputs(seed=2, grad=True)
    index = torch.tensor([1, 3, -1])
    mask = torch.tensor([[True, True, False, True, True]])
    weight = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    out = nested_attention(q, k, v, 2, index, nk, nv, nested_mask=mask, strength=1.3, token_weight=0.6)
    ref = reference_nested(q, k, v, 2, [NestedKV(index, nk, nv, mask, 1.3, 0.6)])
    inputs = (q, k, v, nk, nv)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    for name, g, rg in zip("q k v nested_k nested_v".split(), grads, ref_grads):
        assert rg.abs().max() > 0, name
        torch.testing.assert_close(g, rg, rtol=0, atol=1e-10, msg=f"gradient w.r.t. {name}")


def test_gradcheck() -> None:
    q, k, v, nk, nv = _inputs(b=2, n=3, t=4, m=3, heads=2, d=2, seed=3, grad=True)
    index = torch.tensor([2, -1])
    mask = torch.tensor([[True, False, True], [True, True, True]])

    def fn(q_, k_, v_, nk_, nv_):
        return nested_attention(
            q_, k_, v_, 2, index, nk_, nv_, nested_mask=mask, strength=0.8, token_weight=1.5
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, nk, nv))


def test_hand_computed_token_weight_and_strength() -> None:
    # one head, d=1, equal logits: w=3 on s*=0 gives outer probs [3/4, 1/4]; v* = 10
    q = torch.tensor([[[1.0]]], dtype=F64)
    k = torch.zeros(1, 2, 1, dtype=F64)
    v = torch.tensor([[[2.0], [6.0]]], dtype=F64)
    nk, nv = torch.zeros(1, 1, 1, dtype=F64), torch.full((1, 1, 1), 10.0, dtype=F64)
    index = torch.tensor([0])
    full = nested_attention(q, k, v, 1, index, nk, nv, token_weight=3.0)
    assert full.item() == pytest.approx(0.75 * 10 + 0.25 * 6, abs=1e-12)  # 9
    half = nested_attention(q, k, v, 1, index, nk, nv, token_weight=3.0, strength=0.5)
    assert half.item() == pytest.approx(0.75 * 6 + 0.25 * 6, abs=1e-12)  # V[s*] = 2 + 0.5 * 8
    plain_weighted = nested_attention(q, k, v, 1, index, nk, nv, token_weight=3.0, strength=0.0)
    assert plain_weighted.item() == pytest.approx(0.75 * 2 + 0.25 * 6, abs=1e-12)  # 3


def test_single_text_token_returns_inner_attention() -> None:
    # with one text token the outer softmax is 1 on s*, so the output is the nested readout
    q, k, v, nk, nv = _inputs(b=1, t=1, seed=4)
    out = nested_attention(q, k, v, 2, torch.tensor([0]), nk, nv, token_weight=5.0)
    inner = plain_attention(q, nk, nv, 2)
    torch.testing.assert_close(out, inner, rtol=0, atol=1e-12)


def test_strength_zero_is_plain_attention_float32() -> None:
    q, k, v, nk, nv = _inputs(b=2, n=16, t=9, m=4, heads=4, d=8, dtype=torch.float32, seed=5)
    out = nested_attention(q, k, v, 4, torch.tensor([3, 5]), nk, nv, strength=0.0)
    torch.testing.assert_close(out, plain_attention(q, k, v, 4), rtol=0, atol=1e-6)


def test_nested_value_equal_to_subject_value_is_plain() -> None:
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-6)):
        q, k, v, nk, _ = _inputs(b=2, m=1, dtype=dtype, seed=6)
        index = torch.tensor([1, 5])
        nv = v[torch.arange(2), index][:, None, :]  # one nested token whose value is V[s*]
        out = nested_attention(q, k, v, 2, index, nk, nv)
        torch.testing.assert_close(out, plain_attention(q, k, v, 2), rtol=0, atol=tol)


def test_rows_without_subject_keep_plain_numerics() -> None:
    q, k, v, nk, nv = _inputs(b=3, dtype=torch.float32, seed=7)
    index = torch.tensor([-1, 3, -1])
    out = nested_attention(q, k, v, 2, index, nk, nv, token_weight=2.5, strength=1.2)
    sdpa = F.scaled_dot_product_attention(_heads(q, 2), _heads(k, 2), _heads(v, 2))
    sdpa = sdpa.permute(0, 2, 1, 3).reshape(3, 6, 6)
    assert torch.equal(out[0], sdpa[0])
    assert torch.equal(out[2], sdpa[2])
    assert (out[1] - sdpa[1]).abs().max() > 1e-3


def test_nested_mask_excludes_tokens() -> None:
    q, k, v, nk, nv = _inputs(b=2, seed=8)
    index = torch.tensor([2, 0])
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    out = nested_attention(q, k, v, 2, index, nk, nv, nested_mask=mask)
    nk2, nv2 = nk.clone(), nv.clone()
    nk2[0, 2] += 5.0
    nv2[0, 4] -= 7.0
    nv2[1, 0] *= 3.0
    changed = nested_attention(q, k, v, 2, index, nk2, nv2, nested_mask=mask)
    torch.testing.assert_close(changed, out, rtol=0, atol=1e-12)
    nv3 = nv.clone()
    nv3[0, 1] += 1.0  # a usable token
    assert (nested_attention(q, k, v, 2, index, nk, nv3, nested_mask=mask) - out).abs().max() > 1e-4


def test_row_with_no_usable_nested_token_is_plain() -> None:
    q, k, v, nk, nv = _inputs(b=2, seed=9)
    mask = torch.tensor([[False] * 5, [True] * 5])
    out = nested_attention(q, k, v, 2, torch.tensor([2, 2]), nk, nv, nested_mask=mask)
    assert torch.isfinite(out).all()
    plain = plain_attention(q, k, v, 2)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=1e-12)
    assert (out[1] - plain[1]).abs().max() > 1e-3


def test_invalid_arguments() -> None:
    q, k, v, nk, nv = _inputs(b=2, seed=10)
    with pytest.raises(IndexError):
        nested_attention(q, k, v, 2, torch.tensor([7, 0]), nk, nv)
    with pytest.raises(ValueError):
        nested_attention(q, k, v, 2, torch.tensor([1, 0, 2]), nk, nv)
    with pytest.raises(ValueError):
        nested_attention(q, k, v, 2, torch.tensor([1, 0]), torch.cat([nk, nk]), torch.cat([nv, nv]))
    with pytest.raises(ValueError):
        nested_attention(q, k, v, 2, torch.tensor([1, 0]), nk, nv, token_weight=-1.0)


def test_low_precision_inputs() -> None:
    q, k, v, nk, nv = _inputs(b=2, seed=11, dtype=torch.float32)
    index = torch.tensor([1, -1])
    expected = nested_attention(q, k, v, 2, index, nk, nv, token_weight=1.5)
    low = [x.to(torch.bfloat16) for x in (q, k, v, nk, nv)]
    out = nested_attention(*low[:3], 2, index, *low[3:], token_weight=1.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=5e-2)


def _two_subjects(b: int, n: int, seed: int, mask_a: Optional[torch.Tensor], mask_b: Optional[torch.Tensor]):
    q, k, v, nk, nv = _inputs(b=b, n=n, seed=seed)
    _, _, _, nk_b, nv_b = _inputs(b=b, n=n, m=3, seed=seed + 100)
    a = NestedKV(torch.tensor([1, 2]), nk, nv, None, 0.9, 1.7, mask_a)
    s_b = NestedKV(torch.tensor([4, -1]), nk_b, nv_b, None, 1.2, 0.5, mask_b)
    return (q, k, v), a, s_b


def test_multi_matches_reference() -> None:
    soft = torch.linspace(0, 1, 6, dtype=F64)[None].expand(2, -1)
    hard = torch.tensor([[True, False, True, False, True, False]])
    (q, k, v), a, b = _two_subjects(2, 6, seed=12, mask_a=soft, mask_b=hard)
    out = nested_attention_multi(q, k, v, 2, [a, b])
    torch.testing.assert_close(out, reference_nested(q, k, v, 2, [a, b]), rtol=0, atol=1e-10)
    no_masks = [NestedKV(**{**s.__dict__, "query_mask": None}) for s in (a, b)]
    out_free = nested_attention_multi(q, k, v, 2, no_masks)
    torch.testing.assert_close(out_free, reference_nested(q, k, v, 2, no_masks), rtol=0, atol=1e-10)


def test_multi_query_mask_confines_update() -> None:
    mask_a = torch.tensor([[True, True, False, False, True, False], [False, True, True, False, False, True]])
    (q, k, v), a, b = _two_subjects(2, 6, seed=13, mask_a=mask_a, mask_b=None)
    out = nested_attention_multi(q, k, v, 2, [a, b])
    # same outer logits (same token weights) but no update from subject A
    a_off = NestedKV(**{**a.__dict__, "strength": 0.0})
    without_a = nested_attention_multi(q, k, v, 2, [a_off, b])
    outside, inside = ~mask_a, mask_a
    torch.testing.assert_close(out[outside], without_a[outside], rtol=0, atol=1e-12)
    assert (out[inside] - without_a[inside]).abs().amax(dim=-1).min() > 1e-4


def test_multi_without_subjects_is_plain() -> None:
    q, k, v, _, _ = _inputs(b=2, seed=14)
    out = nested_attention_multi(q, k, v, 2, [])
    torch.testing.assert_close(out, plain_attention(q, k, v, 2), rtol=0, atol=1e-12)


def test_update_on_a_given_plain_output_matches_the_full_op() -> None:
    (q, k, v), a, b = _two_subjects(2, 6, seed=15, mask_a=None, mask_b=None)
    plain = plain_attention(q, k, v, 2)
    out = nested_update(plain, q, k, v, 2, [a, b])
    torch.testing.assert_close(out, reference_nested(q, k, v, 2, [a, b]), rtol=0, atol=1e-10)
    assert nested_update(plain, q, k, v, 2, []) is plain


def test_exclusive_gives_each_query_one_subject() -> None:
    (q, k, v), a, b = _two_subjects(2, 6, seed=16, mask_a=None, mask_b=None)
    b = NestedKV(**{**b.__dict__, "subject_index": torch.tensor([4, 5])})
    a_only = nested_attention_multi(q, k, v, 2, [a, NestedKV(**{**b.__dict__, "strength": 0.0})])
    b_only = nested_attention_multi(q, k, v, 2, [NestedKV(**{**a.__dict__, "strength": 0.0}), b])
    neither = nested_attention_multi(q, k, v, 2, [NestedKV(**{**s.__dict__, "strength": 0.0}) for s in (a, b)])
    plain = plain_attention(q, k, v, 2)
    out = nested_update(plain, q, k, v, 2, [a, b], exclusive=True)
    # every query row equals exactly one of the single-subject outputs: the one it attends to most
    from_a = (out - a_only).abs().amax(-1) < 1e-10
    from_b = (out - b_only).abs().amax(-1) < 1e-10
    assert bool((from_a ^ from_b).all())
    assert bool(from_a.any()) and bool(from_b.any())
    assert (a_only - neither).abs().amax() > 1e-4 and (b_only - neither).abs().amax() > 1e-4
