"""The weighted BCE loss of self-paced MIML training (README, "The method in brief")."""
import torch
import torch.nn.functional as F


def weighted_bce_loss(logits, target, alpha, granularity):
    """``sum_{i,k} w_ik * BCE(sigmoid(z_ik), y_ik)`` over the batch (summed, as the reference).

    - label granularity: ``w_ik = ReLU(alpha_ik)`` where the target equals 1, 1 elsewhere (as
      the reference's ``bce[target == 1] *= ...``): with soft targets only the entries at 1,
      the tile's largest-weight labels, are weighted;
    - sample granularity: ``w_ik = ReLU(alpha_i)`` for the whole row.
    NaN weights count as 0. Since ``dL/dalpha_ik = BCE_ik >= 0`` on weighted entries, weights
    only shrink under gradient descent, fastest for hard instances: the self-paced effect.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    w = torch.relu(torch.nan_to_num(alpha, nan=0.0))
    if granularity == "label":
        w = torch.where(target == 1, w, torch.ones_like(w))
    elif granularity == "sample":
        w = w[:, None]
    else:
        raise ValueError(f"unknown granularity {granularity!r}")
    return (w * bce).sum()
