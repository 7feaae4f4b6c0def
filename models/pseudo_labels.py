"""Training targets from bag labels and weights: ``--trainingLabel real | pseudo | soft``."""
import torch

TRAINING_LABELS = ("real", "pseudo", "soft")


def weight_scores(labels, alpha):
    """``xi = t * ReLU(alpha)`` (detached), min-max normalised over classes per row, NaN -> 0."""
    a = torch.relu(torch.nan_to_num(alpha.detach(), nan=0.0))
    xi = labels * (a if a.dim() == 2 else a[:, None])
    lo = xi.amin(dim=1, keepdim=True)
    hi = xi.amax(dim=1, keepdim=True)
    return torch.nan_to_num((xi - lo) / (hi - lo), nan=0.0, posinf=0.0, neginf=0.0)


def make_targets(labels, alpha, mode, generator=None):
    """Targets for one batch of tiles.

    - ``real``: the bag labels ``t``.
    - ``pseudo`` (the reference's full model): ``Bernoulli(xi)``: the largest-weight label has
      ``xi = 1`` and is always kept, another label ``k`` with probability about
      ``alpha_k / alpha_max``.
    - ``soft`` (the paper's text): ``xi`` itself as a soft target.
    """
    labels = labels.float()
    if mode == "real":
        return labels
    xi = weight_scores(labels, alpha)
    if mode == "soft":
        return xi
    if mode == "pseudo":
        # drawn in float64 as the reference did (its labels were float64): on the CPU the same
        # seed then gives the reference's draws, since a float64 draw takes 64 random bits
        return torch.bernoulli(xi.double(), generator=generator).to(xi.dtype)
    raise ValueError(f"unknown training label {mode!r} (expected one of {TRAINING_LABELS})")
