"""Learnable per-instance sample weights of self-paced MIML training (SPEC_ANA.md).

Where the sample weights live and how they are initialised, grouped, updated and turned into
sampling probabilities. Shapes: ``T`` training tiles, ``C`` classes; ``targets`` is the
[T, C] 0/1 matrix of tile labels copied from their bags. Weights are ``[T, C]`` at label
granularity and ``[T]`` at sample granularity.
"""
import math

import torch

from utils.errors import UserError

INIT_METHODS = ("iw-ones", "iw-data", "iw-sample")
LR_METHODS = ("ulr-ones", "ulr-adaptive")
GRANULARITIES = ("label", "sample")


def label_groups(targets):
    """Group tiles by identical label combination (entries > 0 count as labels).

    Returns ``(group_of_tile [T] long, combos [G, C] bool)``.
    """
    combos, group = torch.unique(targets > 0, dim=0, return_inverse=True)
    return group, combos


def init_weights(targets, method, granularity):
    """Initial weights ``alpha`` for ``--initWeight`` (float32, detached).

    - ``iw-ones``: ``t_i`` (label) or 1 (sample).
    - ``iw-data``: label: class frequencies over the training tiles, normalised to sum 1,
      then a softmax over each tile's positive classes only, times ``t_i``. Sample: each tile
      gets ``softmax_g(n_g / T)`` of its label-combination group ``g`` of size ``n_g``.
    - ``iw-sample``: per bag, the bag's label counts over its tiles normalised to sum 1. All
      tiles of a bag share its labels, so this is ``1/|y|`` on each positive class (and the
      softmax of the paper's Eq. 11 over those equal counts gives the same uniform value).
      At sample granularity the scalar is that same ``1/|y_i|``.
    Tiles without any label get all-zero weights.
    """
    t = (targets > 0).float()
    n_pos = t.sum(dim=1)
    if method == "iw-ones":
        return t.clone() if granularity == "label" else torch.ones(len(t))
    if method == "iw-data":
        if granularity == "label":
            freq = t.sum(dim=0)
            freq = freq / freq.sum().clamp_min(1e-12)
            logits = freq.expand_as(t).masked_fill(t == 0, float("-inf"))
            alpha = torch.softmax(logits, dim=1).nan_to_num(0.0)  # rows without labels -> 0
            return alpha * t
        group, _ = label_groups(t)
        sizes = torch.bincount(group).float()
        return torch.softmax(sizes / len(t), dim=0)[group] * (n_pos > 0)
    if method == "iw-sample":
        inv = torch.where(n_pos > 0, 1.0 / n_pos.clamp_min(1), torch.zeros_like(n_pos))
        return t * inv[:, None] if granularity == "label" else inv
    raise ValueError(f"unknown weight initialisation {method!r} (expected one of {INIT_METHODS})")


def lr_coefficients(targets, method):
    """Per-tile learning-rate multipliers ``lambda`` for ``--updateLR`` (shape [T]).

    ``ulr-ones``: 1 everywhere. ``ulr-adaptive``: ``log|y_g| / log C_max`` for the tile's label
    combination ``g`` (``|y_g|`` its number of labels, ``C_max`` the largest in the data), so
    single-label tiles get 0 and never change weight; inf/NaN (no labels, ``C_max == 1``) -> 0.
    """
    if method == "ulr-ones":
        return torch.ones(len(targets))
    if method != "ulr-adaptive":
        raise ValueError(f"unknown lr update {method!r} (expected one of {LR_METHODS})")
    group, combos = label_groups(targets)
    sizes = combos.sum(dim=1).float()
    c_max = sizes.max().item() if len(sizes) else 0.0
    if c_max <= 1:
        return torch.zeros(len(targets))
    lam = torch.log(sizes) / math.log(c_max)
    lam = torch.nan_to_num(lam, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    return lam[group]


def sampler_weights(alpha, targets):
    """Sampling score per tile: ``max_k ReLU(alpha_ik) * t_ik`` (label) or ``ReLU(alpha_i)``.

    NaN weights count as 0. Raises :class:`UserError` when every score is zero, since no
    instance could then be drawn.
    """
    a = torch.relu(alpha.nan_to_num(0.0))
    s = (a * (targets > 0)).amax(dim=1) if a.dim() == 2 else a
    if not torch.any(s > 0):
        raise UserError("every instance weight has dropped to zero: no (tile, label) pair is left to learn from "
                        "(or to sample); lower --weight_lr")
    return s


def weight_stats(alpha, targets):
    """Summary of the weights in use, ``ReLU(alpha)`` on positive pairs: mean, min, max, dropped."""
    a = torch.relu(alpha.nan_to_num(0.0))
    pos = (targets > 0) if a.dim() == 2 else (targets > 0).any(dim=1)
    vals = a[pos]
    return {
        "mean": vals.mean().item() if vals.numel() else 0.0,
        "min": vals.min().item() if vals.numel() else 0.0,
        "max": vals.max().item() if vals.numel() else 0.0,
        "dropped_fraction": (vals <= 0).float().mean().item() if vals.numel() else 0.0,
    }


class InstanceWeights:
    """The learnable weights ``alpha`` with a vectorised, row-sparse Adam update.

    The reference code kept one ``nn.Parameter`` per tile inside the network's Adam, with one
    parameter group per label combination at learning rate ``lambda_g * weight_lr``, and rebuilt
    that Adam every epoch. Its semantics, kept here without Python loops:

    - a tile's weights move only on steps where the tile is in the batch (a parameter without a
      gradient is skipped by Adam), with its own step count for bias correction;
    - the step size of tile ``i`` is ``lambda_i * weight_lr``;
    - the moment estimates restart every epoch (the rebuilt Adam), see :meth:`reset_state`.

    The network keeps its own optimiser; its state is not reset unless asked for.
    """

    def __init__(self, alpha, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.alpha = alpha.float().clone()
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.lr_scale = torch.ones(len(self.alpha))
        self.reset_state()

    def to(self, device):
        for name in ("alpha", "lr_scale", "exp_avg", "exp_avg_sq", "steps"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def reset_state(self):
        """Forget the Adam moments and step counts (what rebuilding the reference's Adam did)."""
        self.exp_avg = torch.zeros_like(self.alpha)
        self.exp_avg_sq = torch.zeros_like(self.alpha)
        self.steps = torch.zeros(len(self.alpha), device=self.alpha.device)

    def set_lr_scale(self, lam):
        self.lr_scale = lam.to(self.alpha.device, torch.float32)

    def gather(self, idx):
        """Leaf tensor of the batch's weights; its ``.grad`` is passed to :meth:`step`."""
        return self.alpha[idx].detach().requires_grad_(True)

    @torch.no_grad()
    def step(self, idx, grad):
        """One Adam step on the rows ``idx`` with gradients ``grad`` (rows of a batch).

        Rows drawn more than once in a batch (sampling with replacement) have their gradients
        summed and take one step, as a shared parameter would.
        """
        rows, inverse = torch.unique(idx, return_inverse=True)
        g = torch.zeros((len(rows),) + tuple(grad.shape[1:]), device=grad.device, dtype=torch.float32)
        g.index_add_(0, inverse, grad.float())
        a = self.alpha[rows]
        if self.weight_decay:
            g = g + self.weight_decay * a
        b1, b2 = self.betas
        m = self.exp_avg[rows].mul_(b1).add_(g, alpha=1 - b1)
        v = self.exp_avg_sq[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
        t = self.steps[rows] + 1
        bc1 = 1 - b1 ** t
        bc2 = 1 - b2 ** t
        step_size = self.lr * self.lr_scale[rows] / bc1
        if g.dim() == 2:
            step_size, bc2 = step_size[:, None], bc2[:, None]
        self.alpha[rows] = a - step_size * m / ((v / bc2).sqrt() + self.eps)
        self.exp_avg[rows] = m
        self.exp_avg_sq[rows] = v
        self.steps[rows] = t

    def state_dict(self):
        return {"alpha": self.alpha.cpu(), "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(),
                "steps": self.steps.cpu(), "lr_scale": self.lr_scale.cpu()}

    def load_state_dict(self, state):
        device = self.alpha.device
        if state["alpha"].shape != self.alpha.shape:
            raise UserError(f"the checkpoint's sample weights have shape {tuple(state['alpha'].shape)} but this data "
                            f"gives {tuple(self.alpha.shape)}; resume with the same data and --granularity")
        for name in ("alpha", "exp_avg", "exp_avg_sq", "steps", "lr_scale"):
            setattr(self, name, state[name].to(device))
