"""Unit tests for attention/calibration.py."""
from __future__ import annotations

import math

import pytest
import torch

from concept_attention.attention import calibration as cal
from concept_attention.attention.maps import minmax_normalize

SPEC_1D = [0.21194, 0.57612, 0.21194]
SPEC_2D = [
    [0.04492, 0.12210, 0.04492],
    [0.12210, 0.33191, 0.12210],
    [0.04492, 0.12210, 0.04492],
]


def test_gaussian_kernel_reproduces_spec_values() -> None:
    kernel = cal.gaussian_kernel()
    assert kernel.shape == (3, 3)
    torch.testing.assert_close(kernel, torch.tensor(SPEC_2D), rtol=0, atol=1e-4)
    torch.testing.assert_close(kernel.sum(dim=1) / kernel.sum(), torch.tensor(SPEC_1D), rtol=0, atol=1e-4)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_gaussian_kernel_standard_formula() -> None:
    kernel = cal.gaussian_kernel(3, 0.5, formula="standard", dtype=torch.float64)
    e = math.exp(-2.0)
    g = torch.tensor([e, 1.0, e], dtype=torch.float64) / (1 + 2 * e)  # [0.10650, 0.78701, 0.10650]
    torch.testing.assert_close(kernel, torch.outer(g, g), rtol=0, atol=1e-12)
    # the official quirk equals the standard formula with sigma * sqrt(2)
    quirk = cal.gaussian_kernel(5, 0.8, formula="disendiff", dtype=torch.float64)
    std = cal.gaussian_kernel(5, 0.8 * math.sqrt(2.0), formula="standard", dtype=torch.float64)
    torch.testing.assert_close(quirk, std, rtol=0, atol=1e-12)


def test_gaussian_kernel_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        cal.gaussian_kernel(4)
    with pytest.raises(ValueError):
        cal.gaussian_kernel(3, formula="other")
    with pytest.raises(ValueError):
        cal.gaussian_kernel(3, sigma=0.0)


def test_gaussian_smooth_reflect_padding_hand_values() -> None:
    kernel = cal.gaussian_kernel()
    corner = torch.zeros(3, 3)
    corner[0, 0] = 1.0
    out = cal.gaussian_smooth(corner, kernel)
    # reflect padding: the padded (-1,-1) pixel is (1,1), so the corner sees only the centre weight
    assert out[0, 0].item() == pytest.approx(0.33191, abs=1e-4)
    assert out[1, 0].item() == pytest.approx(0.12210, abs=1e-4)
    assert out[1, 1].item() == pytest.approx(0.04492, abs=1e-4)
    edge = torch.zeros(3, 3)
    edge[0, 1] = 1.0
    # (0,1) is reached twice from (0,0): directly and through its reflection at (0,-1)
    assert cal.gaussian_smooth(edge, kernel)[0, 0].item() == pytest.approx(2 * 0.12210, abs=1e-4)


def test_gaussian_smooth_delta_and_constant() -> None:
    kernel = cal.gaussian_kernel()
    delta = torch.zeros(2, 3, 5, 5)
    delta[1, 2, 2, 2] = 1.0
    out = cal.gaussian_smooth(delta, kernel)
    assert out.shape == delta.shape
    torch.testing.assert_close(out[1, 2, 1:4, 1:4], kernel, rtol=0, atol=1e-7)
    assert out[0].abs().max().item() == 0.0
    const = cal.gaussian_smooth(torch.full((1, 4, 4), 0.7), kernel)
    torch.testing.assert_close(const, torch.full((1, 4, 4), 0.7), rtol=0, atol=1e-6)


def test_gaussian_smooth_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 4, 4, dtype=torch.float64, requires_grad=True)
    kernel = cal.gaussian_kernel(dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: cal.gaussian_smooth(t, kernel), (x,))


def test_suppress() -> None:
    x = torch.tensor([0.5, 0.2, 1.0])
    torch.testing.assert_close(cal.suppress(x), torch.tensor([0.25, 0.04, 1.0]))
    torch.testing.assert_close(cal.suppress(x, 3.0), torch.tensor([0.125, 0.008, 1.0]))
    assert torch.equal(cal.suppress(x, None), x)
    assert torch.equal(cal.suppress(x, 1), x)


def test_soft_iou_hand_case() -> None:
    x = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # I = 1, sum(x + y) = 3.5, U = 2.5
    assert cal.soft_iou(x, y).item() == pytest.approx(2.0 / 3.5)
    assert cal.soft_iou(x, y, smooth=0.0).item() == pytest.approx(1.0 / 2.5)
    batched = cal.soft_iou(torch.stack([x, y]), torch.stack([y, y]))
    assert batched.shape == (2,)
    assert batched[1].item() == pytest.approx(1.0)


def test_soft_iou_gradcheck_and_detach() -> None:
    torch.manual_seed(1)
    x = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cal.soft_iou, (x, y))
    # detach_x is deliberately not the true derivative in x, so only y is checked there
    x_const = x.detach()
    assert torch.autograd.gradcheck(lambda b: cal.soft_iou(x_const, b, 0.5, True), (y,))
    gx, gy = torch.autograd.grad(cal.soft_iou(x, y, detach_x=True).sum(), (x, y), allow_unused=True)
    assert gx is None
    assert gy.abs().sum() > 0


def test_bind_loss_gradient_only_into_modifier() -> None:
    torch.manual_seed(2)
    class_map = torch.rand(2, 4, 4, dtype=torch.float64, requires_grad=True)
    modifier = torch.rand(2, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = cal.bind_loss(class_map, modifier)
    expected = 1.0 - cal.soft_iou(class_map, modifier)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert class_map.grad is None or torch.count_nonzero(class_map.grad) == 0
    assert torch.count_nonzero(modifier.grad) == modifier.numel()
    # gradient w.r.t. the modifier equals the gradient of the undetached IoU w.r.t. it
    full_grad = torch.autograd.grad(-cal.soft_iou(class_map, modifier).sum(), modifier)[0]
    torch.testing.assert_close(modifier.grad, full_grad)
    assert torch.autograd.gradcheck(lambda m: cal.bind_loss(class_map.detach(), m, 1.0), (modifier,))


def test_separation_loss_values() -> None:
    torch.manual_seed(3)
    c = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    two = cal.separation_loss(c[:, :2])
    torch.testing.assert_close(two, cal.soft_iou(c[:, 0], c[:, 1]))
    three = cal.separation_loss(c, smooth=0.5)
    pairs = [cal.soft_iou(c[:, i], c[:, j], smooth=0.5) for i, j in ((0, 1), (0, 2), (1, 2))]
    torch.testing.assert_close(three, sum(pairs) / 3)
    assert three.shape == (2,)
    assert torch.equal(cal.separation_loss(c[:, :1]), torch.zeros(2, dtype=torch.float64))


def test_separation_loss_gradient_into_both_classes() -> None:
    torch.manual_seed(4)
    c = torch.rand(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    cal.separation_loss(c).sum().backward()
    assert torch.count_nonzero(c.grad[:, 0]) == c.grad[:, 0].numel()
    assert torch.count_nonzero(c.grad[:, 1]) == c.grad[:, 1].numel()
    c3 = torch.rand(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cal.separation_loss, (c3,))


def test_settings_defaults() -> None:
    s = cal.CalibrationSettings()
    assert (s.weight, s.use_bind, s.use_separation, s.gaussian) == (0.01, True, True, True)
    assert (s.sigma, s.kernel_size, s.sigma_formula) == (0.5, 3, "disendiff")
    assert (s.suppression_power, s.iou_smooth, s.normalize) == (2.0, 1.0, True)
    with pytest.raises(ValueError):
        cal.CalibrationSettings(sigma_formula="nope")


def test_prepare_maps_order_and_decoupled_suppression() -> None:
    torch.manual_seed(5)
    raw = torch.rand(2, 2, 4, 4, dtype=torch.float64) * 3.0
    s = cal.CalibrationSettings()
    kernel = cal.gaussian_kernel(dtype=torch.float64)
    smoothed = cal.gaussian_smooth(minmax_normalize(raw), kernel)
    torch.testing.assert_close(cal.prepare_maps(raw, s, is_class=False), smoothed)
    torch.testing.assert_close(cal.prepare_maps(raw, s, is_class=True), smoothed**2)
    # suppression stays on when the Gaussian is off
    no_gauss = cal.CalibrationSettings(gaussian=False)
    torch.testing.assert_close(cal.prepare_maps(raw, no_gauss, True), minmax_normalize(raw) ** 2)
    no_norm = cal.CalibrationSettings(normalize=False, gaussian=False, suppression_power=None)
    torch.testing.assert_close(cal.prepare_maps(raw, no_norm, True), raw)


def _manual_loss(mod: torch.Tensor, cls: torch.Tensor, weight: float) -> torch.Tensor:
    """docs/method.md §8 written out for two concepts, independent of calibration_loss's plumbing."""
    kernel = cal.gaussian_kernel(dtype=mod.dtype)

    def g(t: torch.Tensor) -> torch.Tensor:
        return cal.gaussian_smooth(minmax_normalize(t), kernel)

    def iou(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        inter = (x * y).sum()
        return (inter + 1) / ((x + y).sum() - inter + 1)

    per_sample = []
    for b in range(mod.shape[0]):
        c1, c2 = g(cls[b, 0]) ** 2, g(cls[b, 1]) ** 2
        m1, m2 = g(mod[b, 0]), g(mod[b, 1])
        per_sample.append((1 - iou(c1, m1)) + (1 - iou(c2, m2)) + iou(c2, c1))
    return weight * torch.stack(per_sample).mean()


def test_calibration_loss_matches_spec_formula() -> None:
    torch.manual_seed(6)
    mod = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    cls = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    s = cal.CalibrationSettings()
    out = cal.calibration_loss(mod, cls, s)
    assert set(out) == {"bind", "separation", "total"}
    torch.testing.assert_close(out["total"], _manual_loss(mod, cls, 0.01), rtol=0, atol=1e-12)
    torch.testing.assert_close(out["total"], 0.01 * (out["bind"] + out["separation"]))
    assert out["bind"].item() > 0 and out["separation"].item() > 0


def test_calibration_loss_switches_and_weight() -> None:
    torch.manual_seed(7)
    mod = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    cls = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    full = cal.calibration_loss(mod, cls, cal.CalibrationSettings())
    only_sep = cal.calibration_loss(mod, cls, cal.CalibrationSettings(use_bind=False))
    assert only_sep["bind"].item() == 0.0
    torch.testing.assert_close(only_sep["total"], 0.01 * full["separation"])
    only_bind = cal.calibration_loss(mod, cls, cal.CalibrationSettings(use_separation=False, weight=2.0))
    assert only_bind["separation"].item() == 0.0
    torch.testing.assert_close(only_bind["total"], 2.0 * full["bind"])
    with pytest.raises(ValueError):
        cal.calibration_loss(mod, cls[:, :1], cal.CalibrationSettings())


def test_calibration_rows_average_only_the_selected_rows() -> None:
    torch.manual_seed(9)
    settings = cal.CalibrationSettings()
    mod = cal.prepare_maps(torch.rand(3, 2, 5, 5, dtype=torch.float64), settings, is_class=False)
    cls = cal.prepare_maps(torch.rand(3, 2, 5, 5, dtype=torch.float64), settings, is_class=True)
    picked = torch.tensor([True, False, True])
    some = cal.calibration_terms(mod, cls, settings, picked)
    subset = cal.calibration_terms(mod[picked], cls[picked], settings)
    for name in ("bind", "separation", "total"):
        torch.testing.assert_close(some[name], subset[name], rtol=0, atol=1e-12)
    every = cal.calibration_terms(mod, cls, settings)
    assert abs(some["total"].item() - every["total"].item()) > 1e-6  # the middle row counted in one only
    torch.testing.assert_close(cal.calibration_terms(mod, cls, settings, torch.ones(3, dtype=torch.bool))["total"],
                               every["total"], rtol=0, atol=1e-12)
    raw = torch.rand(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    none = cal.calibration_terms(cal.prepare_maps(raw, settings, is_class=False), cls, settings,
                                 torch.zeros(3, dtype=torch.bool))
    assert none["bind"].item() == 0.0 and none["separation"].item() == 0.0 and none["total"].item() == 0.0
    none["total"].backward()
    assert torch.equal(raw.grad, torch.zeros_like(raw))
    poisoned = cls.clone()
    poisoned[1] = float("nan")  # a dropped row's NaN must not reach the terms
    kept = cal.calibration_terms(mod, poisoned, settings, picked)
    torch.testing.assert_close(kept["total"], subset["total"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_t", [0.0, -0.5, 1.5, float("nan")])
def test_calibration_window_outside_zero_one_is_refused(max_t: float) -> None:
    with pytest.raises(ValueError, match="max_t must be in"):
        cal.CalibrationSettings(max_t=max_t)


def test_calibration_loss_gradients() -> None:
    torch.manual_seed(8)
    mod = torch.rand(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    cls = torch.rand(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    bind_only = cal.CalibrationSettings(use_separation=False)
    cal.calibration_loss(mod, cls, bind_only)["total"].backward()
    assert cls.grad is None or torch.count_nonzero(cls.grad) == 0
    assert torch.count_nonzero(mod.grad) > 0
    # The detached bind term makes the class-map gradient differ from finite differences by
    # design, so the class maps are checked through the separation term alone.
    cls_const = cls.detach()
    full = cal.CalibrationSettings(weight=1.0)
    assert torch.autograd.gradcheck(lambda m: cal.calibration_loss(m, cls_const, full)["total"], (mod,))
    sep_only = cal.CalibrationSettings(weight=1.0, use_bind=False)
    assert torch.autograd.gradcheck(lambda c: cal.calibration_loss(mod, c, sep_only)["total"], (cls,))
