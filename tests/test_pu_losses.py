"""PU losses and ramps against values and gradients worked out by hand from the formulas."""
import math

import pytest
import torch

from models.losses_pu import (consistency_weight, entropy_loss, entropy_weight, nnpu_loss,
                              selective_consistency_loss)


def sp(x):
    """softplus(x) = log(1 + e^x): BCE(z, 0) = sp(z), BCE(z, 1) = sp(-z)."""
    return math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def t(values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def mask(values):
    return torch.tensor(values, dtype=torch.bool)


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------- nnPU
# batch: positives z = 2.0, -1.0; unlabelled z = 0.5, -0.5, 1.5
Z1 = [2.0, 0.5, -1.0, -0.5, 1.5]
P1 = [True, False, True, False, False]


def test_nnpu_value_and_gradient_when_the_negative_risk_is_kept():
    prior = 0.3
    r_pp = (sp(-2.0) + sp(1.0)) / 2              # mean_P BCE(z, 1)
    r_pm = (sp(2.0) + sp(-1.0)) / 2              # mean_P BCE(z, 0)
    r_um = (sp(0.5) + sp(-0.5) + sp(1.5)) / 3    # mean_U BCE(z, 0)
    r = r_um - prior * r_pm
    assert r > 0  # the ordinary branch
    z = t(Z1, grad=True)
    out = nnpu_loss(z, mask(P1), prior)
    assert out["objective"].item() == approx(prior * r_pp + r)
    assert out["loss"].item() == approx(prior * r_pp + r)
    assert out["loss_pos"].item() == approx(prior * r_pp)
    assert out["loss_neg"].item() == approx(r)
    out["objective"].backward()
    # d/dz of prior*sp(-z)/nP - prior*sp(z)/nP on a positive: -prior/nP * (sig(-z) + sig(z)) = -prior/nP
    # on an unlabelled: sig(z)/nU
    expected = [-prior / 2, sig(0.5) / 3, -prior / 2, sig(-0.5) / 3, sig(1.5) / 3]
    assert z.grad.tolist() == pytest.approx(expected, rel=1e-9)


# positives z = 3.0, 2.0 (confidently positive); unlabelled z = -3, -2, -4 (confidently negative):
# the unbiased negative risk goes below zero.
Z2 = [3.0, -3.0, 2.0, -2.0, -4.0]
P2 = [True, False, True, False, False]
PRIOR2 = 0.3
R_PP2 = (sp(-3.0) + sp(-2.0)) / 2
R_PM2 = (sp(3.0) + sp(2.0)) / 2
R_UM2 = (sp(-3.0) + sp(-2.0) + sp(-4.0)) / 3
R2 = R_UM2 - PRIOR2 * R_PM2


def test_the_example_has_a_negative_risk_between_minus_one_and_minus_a_half():
    assert -1.0 < R2 < -0.5


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_nnpu_non_negative_correction_ascends_the_negative_risk(gamma):
    z = t(Z2, grad=True)
    out = nnpu_loss(z, mask(P2), PRIOR2, beta=0.0, gamma=gamma)
    assert out["objective"].item() == approx(-gamma * R2)
    assert out["loss"].item() == approx(PRIOR2 * R_PP2)  # reported: prior*R_p+ - beta, beta = 0
    assert out["loss_pos"].item() == approx(PRIOR2 * R_PP2)
    assert out["loss_neg"].item() == approx(R2)
    out["objective"].backward()
    # -gamma * d r/dz: positive +gamma*prior/nP*sig(z), unlabelled -gamma/nU*sig(z); R_p+ gets no gradient
    expected = [gamma * PRIOR2 / 2 * sig(3.0), -gamma / 3 * sig(-3.0), gamma * PRIOR2 / 2 * sig(2.0),
                -gamma / 3 * sig(-2.0), -gamma / 3 * sig(-4.0)]
    assert z.grad.tolist() == pytest.approx(expected, rel=1e-9)


def test_nnpu_beta_above_the_negative_risk_keeps_the_ordinary_objective():
    z = t(Z2, grad=True)
    out = nnpu_loss(z, mask(P2), PRIOR2, beta=1.0, gamma=0.5)  # r >= -1: no correction, r counted as is
    assert out["objective"].item() == approx(PRIOR2 * R_PP2 + R2)
    assert out["loss"].item() == approx(PRIOR2 * R_PP2 + R2)
    out["objective"].backward()
    expected = [-PRIOR2 / 2, sig(-3.0) / 3, -PRIOR2 / 2, sig(-2.0) / 3, sig(-4.0) / 3]
    assert z.grad.tolist() == pytest.approx(expected, rel=1e-9)


def test_nnpu_beta_below_the_negative_risk_reports_prior_risk_minus_beta():
    z = t(Z2, grad=True)
    out = nnpu_loss(z, mask(P2), PRIOR2, beta=0.5, gamma=0.25)  # r < -0.5: corrected
    assert out["objective"].item() == approx(-0.25 * R2)
    assert out["loss"].item() == approx(PRIOR2 * R_PP2 - 0.5)
    assert out["loss_neg"].item() == approx(R2)
    out["objective"].backward()
    assert z.grad[0].item() == approx(0.25 * PRIOR2 / 2 * sig(3.0))
    assert z.grad[1].item() == approx(-0.25 / 3 * sig(-3.0))


def test_nnpu_reported_values_are_detached_and_the_objective_is_not():
    out = nnpu_loss(t(Z1, grad=True), mask(P1), 0.3)
    assert out["objective"].requires_grad
    assert not any(out[k].requires_grad for k in ("loss", "loss_pos", "loss_neg"))


def reference_nnpu(z, is_pos, prior, beta, gamma):
    """A straightforward nnPU (Kiryo et al. 2017, Algorithm 1) with the sigmoid-probability BCE."""
    p = torch.sigmoid(z)
    zp, zu = p[is_pos], p[~is_pos]
    r_pp = -torch.log(zp).mean()
    r_pm = -torch.log(1 - zp).mean()
    r_um = -torch.log(1 - zu).mean()
    positive_risk = prior * r_pp
    negative_risk = r_um - prior * r_pm
    if negative_risk.item() < -beta:
        return -gamma * negative_risk, positive_risk - beta
    return positive_risk + negative_risk, positive_risk + negative_risk


@pytest.mark.parametrize("seed", range(6))
def test_nnpu_agrees_with_a_reference_implementation(seed):
    g = torch.Generator().manual_seed(seed)
    n = 12
    is_pos = torch.zeros(n, dtype=torch.bool)
    is_pos[: 2 + seed % 3] = True
    # shift positives up and unlabelled down in some seeds so both branches are exercised
    z = torch.randn(n, generator=g, dtype=torch.float64) * 2 + torch.where(is_pos, 1.0, -1.0) * (seed % 2) * 3
    prior, beta, gamma = (0.2, 0.4, 0.6)[seed % 3], (0.0, 0.05)[seed % 2], (1.0, 0.7)[seed % 2]
    z_ref = z.clone().requires_grad_(True)
    obj_ref, loss_ref = reference_nnpu(z_ref, is_pos, prior, beta, gamma)
    obj_ref.backward()
    z_ours = z.clone().requires_grad_(True)
    out = nnpu_loss(z_ours, is_pos, prior, beta, gamma)
    out["objective"].backward()
    assert out["objective"].item() == pytest.approx(obj_ref.item(), rel=1e-9)
    assert out["loss"].item() == pytest.approx(loss_ref.item(), rel=1e-9)
    torch.testing.assert_close(z_ours.grad, z_ref.grad, rtol=1e-9, atol=1e-12)


def test_nnpu_is_finite_for_extreme_logits():
    z = torch.tensor([200.0, -200.0, 300.0, -300.0], requires_grad=True)
    out = nnpu_loss(z, mask([True, True, False, False]), 0.3)
    out["objective"].backward()
    assert torch.isfinite(out["objective"]) and torch.isfinite(z.grad).all()


def test_nnpu_half_precision_logits_are_computed_in_float32():
    out = nnpu_loss(torch.tensor(Z1, dtype=torch.float16), mask(P1), 0.3)
    assert out["objective"].dtype == torch.float32


@pytest.mark.parametrize("prior", [0.0, 1.0, -0.1, 1.5])
def test_nnpu_prior_outside_the_open_unit_interval_is_an_error(prior):
    with pytest.raises(ValueError, match="prior must be in"):
        nnpu_loss(t(Z1), mask(P1), prior)


@pytest.mark.parametrize("flags", [[True] * 5, [False] * 5])
def test_nnpu_needs_positives_and_unlabelled(flags):
    with pytest.raises(ValueError, match="at least one positive and one unlabelled"):
        nnpu_loss(t(Z1), mask(flags), 0.3)


def test_nnpu_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="1-D"):
        nnpu_loss(t([Z1]), mask([P1]), 0.3)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        nnpu_loss(t(Z1), mask(P1[:4]), 0.3)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        nnpu_loss(t(Z1), torch.tensor([1, 0, 1, 0, 0]), 0.3)
    with pytest.raises(ValueError, match="beta and gamma"):
        nnpu_loss(t(Z1), mask(P1), 0.3, beta=-0.1)


# ------------------------------------------------------------------------ selective consistency
# index:        0 (P)  1 (U)  2 (U)  3 (U)  4 (U)  5 (P)
Q = [0.99, 0.98, 0.5, 0.02, 0.9, 0.01]   # teacher probabilities on the weak view
ZS = [1.0, 0.3, -1.2, 2.0, 0.7, -0.4]    # student logits on the strong view
PS = [True, False, False, False, False, True]


def test_confidence_mask_on_the_documented_probabilities():
    # c = |q - .5| * 2 = .94, 0, .96, .8: only q = .02 reaches tau = .95 (q >= .975 or q <= .025 needed)
    out = selective_consistency_loss(t([0.3, -1.2, 2.0, 0.7]), t([0.97, 0.5, 0.02, 0.9]),
                                     mask([False] * 4), threshold=0.95)
    assert out["mask"].tolist() == [False, False, True, False]
    assert out["mask_rate"].item() == approx(0.25)
    assert out["pseudo_positive_rate"].item() == 0.0  # the one passing pseudo-label is 0
    assert out["loss"].item() == approx(sp(2.0) / 4)  # BCE(2.0, 0) over 4 unlabelled


def test_selective_consistency_value_gradient_and_rates():
    z = t(ZS, grad=True)
    out = selective_consistency_loss(z, t(Q), mask(PS), threshold=0.95)
    # considered: unlabelled 1-4; passing: 1 (y=1) and 3 (y=0)
    assert out["loss"].item() == approx((sp(-0.3) + sp(2.0)) / 4)
    assert out["mask"].tolist() == [True, False, True, False]
    assert out["mask_rate"].item() == approx(0.5)
    assert out["pseudo_positive_rate"].item() == approx(0.5)
    out["loss"].backward()
    # dBCE(z, y)/dz = sig(z) - y, divided by |U| = 4; positives and masked-out samples get 0
    assert z.grad.tolist() == pytest.approx([0.0, (sig(0.3) - 1) / 4, 0.0, sig(2.0) / 4, 0.0, 0.0], rel=1e-9)


def test_positive_logits_do_not_change_the_selective_loss():
    base = selective_consistency_loss(t(ZS), t(Q), mask(PS))["loss"].item()
    changed = list(ZS)
    changed[0], changed[5] = -7.0, 9.0
    assert selective_consistency_loss(t(changed), t(Q), mask(PS))["loss"].item() == base


def test_standard_fixmatch_includes_positives():
    z = t(ZS, grad=True)
    out = selective_consistency_loss(z, t(Q), mask(PS), threshold=0.95, selective=False)
    # considered: all 6; passing: 0 (y=1), 1 (y=1), 3 (y=0), 5 (y=0)
    assert out["loss"].item() == approx((sp(-1.0) + sp(-0.3) + sp(2.0) + sp(-0.4)) / 6)
    assert out["mask"].tolist() == [True, True, False, True, False, True]
    assert out["mask_rate"].item() == approx(4 / 6)
    assert out["pseudo_positive_rate"].item() == approx(0.5)
    out["loss"].backward()
    assert z.grad[0].item() == approx((sig(1.0) - 1) / 6)
    assert z.grad[5].item() == approx(sig(-0.4) / 6)


def test_no_gradient_reaches_the_teacher():
    teacher_logits = torch.logit(t(Q)).requires_grad_(True)
    z = t(ZS, grad=True)
    out = selective_consistency_loss(z, torch.sigmoid(teacher_logits), mask(PS))
    out["loss"].backward()
    assert teacher_logits.grad is None
    assert z.grad is not None
    assert not out["mask_rate"].requires_grad and not out["pseudo_positive_rate"].requires_grad


def test_consistency_with_no_unlabelled_or_nothing_passing_is_zero():
    out = selective_consistency_loss(t([0.5, 1.0], grad=True), t([0.99, 0.01]), mask([True, True]))
    assert out["loss"].item() == 0.0 and out["mask"].numel() == 0
    assert out["mask_rate"].item() == 0.0 and out["pseudo_positive_rate"].item() == 0.0
    out["loss"].backward()  # still part of the graph
    out = selective_consistency_loss(t([0.5, 1.0]), t([0.6, 0.3]), mask([False, False]))
    assert out["loss"].item() == 0.0 and out["mask"].tolist() == [False, False]
    assert out["pseudo_positive_rate"].item() == 0.0


def test_threshold_is_inclusive_and_half_is_a_positive_pseudo_label():
    out = selective_consistency_loss(t([0.0]), t([0.5]), mask([False]), threshold=0.0)
    assert out["mask"].tolist() == [True] and out["pseudo_positive_rate"].item() == 1.0
    assert out["loss"].item() == approx(math.log(2))


def test_consistency_input_errors():
    with pytest.raises(ValueError, match="teacher_probs has shape"):
        selective_consistency_loss(t(ZS), t(Q[:3]), mask(PS))
    with pytest.raises(ValueError, match="threshold"):
        selective_consistency_loss(t(ZS), t(Q), mask(PS), threshold=1.5)


# ------------------------------------------------------------------------------------ entropy
def binary_entropy(z):
    p = sig(z)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_entropy_value_and_gradient_by_hand():
    z = t([0.0, 2.0, -1.0], grad=True)
    h = entropy_loss(z)
    assert h.item() == approx((math.log(2) + binary_entropy(2.0) + binary_entropy(-1.0)) / 3)
    h.backward()
    # dH/dz = -z p (1 - p)
    assert z.grad.tolist() == pytest.approx([-v * sig(v) * (1 - sig(v)) / 3 for v in (0.0, 2.0, -1.0)], rel=1e-9)


def test_entropy_is_the_mean_over_unlabelled_only():
    z = t([0.0, 2.0, -1.0], grad=True)
    h = entropy_loss(z, mask([False, True, False]))
    assert h.item() == approx((math.log(2) + binary_entropy(-1.0)) / 2)
    h.backward()
    assert z.grad[1].item() == 0.0
    assert entropy_loss(t([1.0, 2.0]), mask([True, True])).item() == 0.0


def test_entropy_peaks_at_logit_zero_with_ln2_and_is_stable():
    z = torch.arange(-50, 51, dtype=torch.float64) / 10
    values = torch.stack([entropy_loss(v.reshape(1)) for v in z])
    assert z[values.argmax()].item() == 0.0
    assert values.max().item() == approx(math.log(2))
    extreme = entropy_loss(torch.tensor([-100.0, 100.0, 1e4]))
    assert torch.isfinite(extreme) and 0.0 <= extreme.item() < 1e-30


# -------------------------------------------------------------------------------------- ramps
@pytest.mark.parametrize("epoch,factor", [(0, 0.0), (5, 0.5), (10, 1.0), (15, 1.0), (20, 1.0)])
def test_consistency_ramp(epoch, factor):
    assert consistency_weight(epoch, 2.0, rampup_epochs=10) == pytest.approx(2.0 * factor)


@pytest.mark.parametrize("epoch,factor", [(0, 0.0), (5, 0.0), (10, 0.0), (15, 0.5), (20, 1.0), (30, 1.0)])
def test_entropy_ramp(epoch, factor):
    assert entropy_weight(epoch, 0.01, start_epoch=10, rampup_epochs=10) == pytest.approx(0.01 * factor)


def test_ramps_without_rampup_are_full_at_once():
    assert consistency_weight(0, 1.0, rampup_epochs=0) == 1.0
    assert entropy_weight(9, 0.01, start_epoch=10, rampup_epochs=0) == 0.0
    assert entropy_weight(10, 0.01, start_epoch=10, rampup_epochs=0) == 0.01
    assert isinstance(consistency_weight(3, 1, 10), float) and isinstance(entropy_weight(12, 1, 10, 10), float)
