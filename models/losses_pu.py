"""Losses and ramp schedules of PU + Selective FixMatch training.

Notation: logits ``z``, ``p = sigmoid(z)``, ``BCE(z, y) = -y log p - (1 - y) log(1 - p)``, computed
from logits as ``BCE(z, 1) = softplus(-z)`` and ``BCE(z, 0) = softplus(z)`` (no overflow, no log 0).
P = the labelled positives of the batch, U = the unlabelled samples.
"""
import torch
import torch.nn.functional as F


def _as_float(x):
    """``x`` in at least float32 (half precision logits would lose the small risks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_batch(logits, is_positive, name):
    """ValueError unless ``logits`` is a 1-D float tensor and ``is_positive`` a bool tensor of its shape."""
    if logits.ndim != 1 or not logits.is_floating_point():
        raise ValueError(f"{name}: logits must be a 1-D float tensor, got shape {tuple(logits.shape)} "
                         f"and dtype {logits.dtype}")
    if is_positive.dtype != torch.bool or is_positive.shape != logits.shape:
        raise ValueError(f"{name}: is_positive must be a bool tensor of shape {tuple(logits.shape)}, got shape "
                         f"{tuple(is_positive.shape)} and dtype {is_positive.dtype}")


def nnpu_loss(logits, is_positive, prior, beta=0.0, gamma=1.0):
    """Non-negative PU risk (Kiryo et al., "Positive-Unlabeled Learning with Non-Negative Risk
    Estimator", NeurIPS 2017) with the logistic (BCE) loss.

    ``R_p+ = mean_P BCE(z, 1)``, ``R_p- = mean_P BCE(z, 0)``, ``R_u- = mean_U BCE(z, 0)``; the
    negative-class risk is estimated as ``r = R_u- - prior * R_p-``.

    - ``r >= -beta``: ``objective = loss = prior * R_p+ + r``.
    - ``r < -beta`` (over-fitting: the estimate of a non-negative risk went negative):
      ``objective = -gamma * r`` (gradient ascent on ``r``, Kiryo et al. Algorithm 1) and the
      reported ``loss = prior * R_p+ - beta``.

    ``logits`` [B] float, ``is_positive`` [B] bool with at least one positive and one unlabelled
    sample (the PU batch sampler guarantees it), ``0 < prior < 1``, ``beta >= 0``, ``gamma >= 0``.
    Returns a dict: ``objective`` (the tensor to backpropagate), and detached ``loss``,
    ``loss_pos = prior * R_p+`` and ``loss_neg = r`` for logging. The branch is chosen with
    ``torch.where`` (no Python ``if`` on a device tensor). Half-precision logits are computed
    in float32.
    """
    _check_batch(logits, is_positive, "nnpu_loss")
    if not 0.0 < prior < 1.0:
        raise ValueError(f"nnpu_loss: prior must be in (0, 1), got {prior!r}")
    if beta < 0 or gamma < 0:
        raise ValueError(f"nnpu_loss: beta and gamma must be >= 0, got beta={beta!r}, gamma={gamma!r}")
    n_pos = int(is_positive.sum())
    if n_pos == 0 or n_pos == logits.numel():
        raise ValueError(f"nnpu_loss: the batch needs at least one positive and one unlabelled sample, "
                         f"got {n_pos} positives of {logits.numel()}")
    z = _as_float(logits)
    pos = is_positive.to(z.dtype)
    unl = 1.0 - pos
    risk_pos_plus = (F.softplus(-z) * pos).sum() / n_pos            # R_p+
    risk_pos_minus = (F.softplus(z) * pos).sum() / n_pos            # R_p-
    risk_unl_minus = (F.softplus(z) * unl).sum() / (z.numel() - n_pos)  # R_u-
    loss_pos = prior * risk_pos_plus
    loss_neg = risk_unl_minus - prior * risk_pos_minus              # r
    keep = loss_neg >= -beta
    objective = torch.where(keep, loss_pos + loss_neg, -gamma * loss_neg)
    loss = torch.where(keep, loss_pos + loss_neg, loss_pos - beta)
    return {"objective": objective, "loss": loss.detach(), "loss_pos": loss_pos.detach(),
            "loss_neg": loss_neg.detach()}


def selective_consistency_loss(strong_logits, teacher_probs, is_positive, threshold=0.95, selective=True):
    """FixMatch consistency (Sohn et al., "FixMatch", NeurIPS 2020) restricted to unlabelled samples.

    From the teacher's probability ``q`` on the weak view: pseudo-label ``y = 1[q >= 0.5]``,
    confidence ``c = |q - 0.5| * 2``, ``mask = c >= threshold``; then
    ``L = (1 / |S|) * sum_{i in S} mask_i * BCE(z_i, y_i)`` with ``z`` the student's logits on
    the strong view and S the considered samples: the unlabelled ones (``selective=True``;
    positives get no consistency term at all), or the whole batch (``selective=False``,
    standard FixMatch). Masked-out samples count in ``|S|`` with 0 loss; ``L = 0`` when S is
    empty. ``teacher_probs`` is detached: no gradient reaches the teacher.

    Returns a dict: ``loss`` (scalar tensor with graph), ``mask`` (bool, one entry per sample of
    S in batch order), ``mask_rate`` (fraction of S passing, detached scalar tensor) and
    ``pseudo_positive_rate`` (fraction of the passing pseudo-labels that are 1; 0 when none
    pass; detached scalar tensor).
    """
    _check_batch(strong_logits, is_positive, "selective_consistency_loss")
    if teacher_probs.shape != strong_logits.shape:
        raise ValueError(f"selective_consistency_loss: teacher_probs has shape {tuple(teacher_probs.shape)}, "
                         f"expected {tuple(strong_logits.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"selective_consistency_loss: threshold must be in [0, 1], got {threshold!r}")
    z = _as_float(strong_logits)
    q = _as_float(teacher_probs.detach())
    considered = ~is_positive if selective else torch.ones_like(is_positive)
    pseudo = (q >= 0.5).to(z.dtype)
    passing = ((q - 0.5).abs() * 2 >= threshold) & considered
    bce = F.binary_cross_entropy_with_logits(z, pseudo, reduction="none")
    n_considered = considered.sum().clamp(min=1)
    n_passing = passing.sum()
    loss = (bce * passing.to(z.dtype)).sum() / n_considered
    return {"loss": loss,
            "mask": passing[considered],
            "mask_rate": (n_passing.to(z.dtype) / n_considered).detach(),
            "pseudo_positive_rate": ((pseudo * passing.to(z.dtype)).sum() / n_passing.clamp(min=1)).detach()}


def entropy_loss(logits, is_positive=None):
    """Entropy minimisation (Grandvalet & Bengio, "Semi-supervised Learning by Entropy
    Minimization", NeurIPS 2005): ``mean_U -(p log p + (1 - p) log(1 - p))``.

    The mean runs over the unlabelled samples (``~is_positive``), over all samples when
    ``is_positive`` is None; 0 when there are none. Computed from logits as
    ``H = p * softplus(-z) + (1 - p) * softplus(z)`` (both terms >= 0: stable for any ``z``);
    its maximum is ``ln 2`` at ``z = 0`` and ``dH/dz = -z p (1 - p)``.
    """
    if is_positive is None:
        is_positive = torch.zeros_like(logits, dtype=torch.bool)
    _check_batch(logits, is_positive, "entropy_loss")
    z = _as_float(logits)
    p = torch.sigmoid(z)
    entropy = p * F.softplus(-z) + (1 - p) * F.softplus(z)
    unl = (~is_positive).to(z.dtype)
    return (entropy * unl).sum() / unl.sum().clamp(min=1)


def consistency_weight(epoch, lambda_consistency, rampup_epochs=10):
    """Consistency weight ``lambda_consistency * min(1, epoch / rampup_epochs)``.

    ``epoch`` is the 0-based epoch index (0 = the first epoch, weight 0); full weight from
    ``epoch = rampup_epochs`` on; ``rampup_epochs <= 0`` gives full weight at once.
    """
    if rampup_epochs <= 0:
        return float(lambda_consistency)
    return float(lambda_consistency) * min(1.0, max(0.0, epoch / rampup_epochs))


def entropy_weight(epoch, lambda_entropy, start_epoch=10, rampup_epochs=10):
    """Entropy weight: 0 for ``epoch < start_epoch``, then
    ``lambda_entropy * min(1, (epoch - start_epoch) / rampup_epochs)``.

    ``epoch`` is the 0-based epoch index (0 = the first epoch). Defaults: 0 through epoch 10,
    half at 15, full from 20 on. ``rampup_epochs <= 0`` gives full weight from ``start_epoch``.
    """
    if epoch < start_epoch:
        return 0.0
    if rampup_epochs <= 0:
        return float(lambda_entropy)
    return float(lambda_entropy) * min(1.0, (epoch - start_epoch) / rampup_epochs)
