"""Learnable per-instance sample weights of self-paced MIML training.

Where the sample weights live and how they are initialised, grouped, updated and turned into
sampling probabilities. Shapes: ``T`` training tiles, ``C`` classes; ``targets`` is the
[T, C] 0/1 matrix of tile labels copied from their bags. Weights are ``[T, C]`` at label
granularity and ``[T]`` at sample granularity.

The weights' optimiser is the reference code's (github fletcherjiang/ANA-SelfPacedLearning,
``main.py``), re-created without Python loops: the weights of a group of tiles are one tensor
and one parameter group of Adam, at learning rate ``lambda_g * weight_lr`` (see
:class:`InstanceWeights`). How the tiles are grouped is ``--weightGroups``:

- ``count`` (the reference ``main.py``): it meant to group tiles by label combination, but it
  compared two label vectors with ``(l1 - l2).sum() == 0``, which holds for any two label sets
  of the same size. So its groups are the tiles with 1 label, with 2 labels, ...
- ``combination``: one group per distinct label combination (what the paper describes).
- ``one``: a single group for every tile (the reference ``main_single.py``: one weight tensor).

``lambda_g`` depends only on the number of labels of the group, so both groupings give every
tile the same learning rate; they differ in which weights take an Adam step together.

``--weightOptimizer sgd`` replaces that Adam with a plain gradient step on the batch's rows,
``alpha -= lambda_g * weight_lr * dL/dalpha``: a pair's weight then shrinks in proportion to
its loss (the paper's self-paced principle), where Adam's step is about ``lambda_g * weight_lr``
whatever the loss (it divides by the running RMS of the gradient).
"""
import math

import torch

from utils.errors import UserError

INIT_METHODS = ("iw-ones", "iw-data", "iw-sample")
LR_METHODS = ("ulr-ones", "ulr-adaptive")
GRANULARITIES = ("label", "sample")
GROUPINGS = ("count", "combination", "one")
WEIGHT_OPTIMIZERS = ("adam", "sgd")
ALL_ZERO_ERROR = ("every instance weight has dropped to zero: the weighted sampler (--sampling) has no tile left "
                  "to draw; lower --weight_lr")


def label_groups(targets, grouping="combination"):
    """Group tiles by their labels (entries > 0 count as labels).

    ``grouping``: ``count`` (tiles with the same number of labels), ``combination`` (the same
    label set) or ``one`` (every tile in group 0). Returns ``(group_of_tile [T] long,
    label_count [G] float)``, the number of labels of each group's tiles.
    """
    pos = targets > 0
    count = pos.sum(dim=1)
    if grouping == "one":
        return torch.zeros(len(targets), dtype=torch.long, device=targets.device), count.max(dim=0, keepdim=True)[0].float()
    if grouping == "count":
        sizes, group = torch.unique(count, return_inverse=True)
        return group, sizes.float()
    if grouping == "combination":
        combos, group = torch.unique(pos, dim=0, return_inverse=True)
        return group, combos.sum(dim=1).float()
    raise ValueError(f"unknown weight grouping {grouping!r} (expected one of {GROUPINGS})")


def init_weights(targets, method, granularity):
    """Initial weights ``alpha`` for ``--initWeight`` (float32, detached).

    - ``iw-ones``: ``t_i`` (label) or 1 (sample).
    - ``iw-data``: label: class frequencies over the training tiles, normalised to sum 1,
      then a softmax over each tile's positive classes only, times ``t_i``. Sample: each tile
      gets ``softmax_g(n_g / T)`` of its group ``g`` of size ``n_g``, the groups being the
      reference's (tiles with the same number of labels, see the module docstring).
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
        group, _ = label_groups(t, "count")
        sizes = torch.bincount(group).float()
        return torch.softmax(sizes / len(t), dim=0)[group] * (n_pos > 0)
    if method == "iw-sample":
        inv = torch.where(n_pos > 0, 1.0 / n_pos.clamp_min(1), torch.zeros_like(n_pos))
        return t * inv[:, None] if granularity == "label" else inv
    raise ValueError(f"unknown weight initialisation {method!r} (expected one of {INIT_METHODS})")


def group_lr_coefficients(label_count, method):
    """Learning-rate multipliers ``lambda_g`` of groups whose tiles have ``label_count`` labels.

    ``ulr-ones``: 1. ``ulr-adaptive``: ``log|y_g| / log C_max`` (``C_max`` the largest label
    count), so single-label groups get 0 and never change weight; inf/NaN (no labels,
    ``C_max == 1``) -> 0, where the reference's first epoch would have failed.
    """
    if method == "ulr-ones":
        return torch.ones(len(label_count))
    if method != "ulr-adaptive":
        raise ValueError(f"unknown lr update {method!r} (expected one of {LR_METHODS})")
    c_max = label_count.max().item() if len(label_count) else 0.0
    if c_max <= 1:
        return torch.zeros(len(label_count))
    lam = torch.log(label_count.float().cpu()) / math.log(c_max)
    return torch.nan_to_num(lam, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)


def lr_coefficients(targets, method):
    """Per-tile ``lambda`` (shape [T]): :func:`group_lr_coefficients` of each tile's label count."""
    group, label_count = label_groups(targets, "count")
    return group_lr_coefficients(label_count, method)[group.cpu()]


def sampler_weights(alpha, targets, strict=True):
    """Sampling score per tile: ``max_k ReLU(alpha_ik) * t_ik`` (label) or ``ReLU(alpha_i)``.

    NaN weights count as 0. With ``strict``, raises :class:`UserError` when every score is
    zero, since no instance could then be drawn.
    """
    a = torch.relu(alpha.nan_to_num(0.0))
    s = (a * (targets > 0)).amax(dim=1) if a.dim() == 2 else a
    if strict and not torch.any(s > 0):
        raise UserError(ALL_ZERO_ERROR)
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
    """The learnable weights ``alpha`` and the reference's per-group Adam, vectorised.

    In the reference each group's weights are one tensor inside the network's Adam, one
    parameter group at learning rate ``lambda_g * weight_lr`` with the network's betas and
    weight decay. What that means, and what :meth:`step` does for all groups at once:

    - a group with at least one tile in the batch has a gradient (zeros on its rows outside
      the batch) and takes an Adam step on ALL its rows: a weight keeps moving on its momentum
      for many steps after its tile was drawn, and weight decay reaches every row;
    - a group with no tile in the batch has no gradient (``zero_grad`` sets it to None) and is
      skipped, its moments and step count unchanged;
    - the step count (Adam's bias correction) is per group, shared by its rows.

    ``ulr-adaptive`` with label groups: after each epoch the reference regrouped the tiles by
    their current targets, recomputed ``lambda`` and built a new Adam, so the moments and step
    counts restart (:meth:`end_epoch`). Otherwise nothing is ever reset. The network keeps its
    own Adam here (same numbers as sharing one: Adam treats parameters independently).

    ``optimizer="sgd"``: :meth:`step` moves only the rows in the batch, by
    ``lambda_g * lr * (grad + weight_decay * alpha)`` (no moments; the groups only set
    ``lambda_g``, and ``ulr-adaptive`` still regroups after each epoch).
    """

    def __init__(self, alpha, targets, lr, *, update_lr="ulr-ones", grouping="count", betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0.0, optimizer="adam"):
        if optimizer not in WEIGHT_OPTIMIZERS:
            raise ValueError(f"unknown weight optimizer {optimizer!r} (expected one of {WEIGHT_OPTIMIZERS})")
        if update_lr not in LR_METHODS:
            raise ValueError(f"unknown lr update {update_lr!r} (expected one of {LR_METHODS})")
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown weight grouping {grouping!r} (expected one of {GROUPINGS})")
        self.alpha = alpha.detach().float().clone()
        self.lr = float(lr)
        self.update_lr = update_lr
        self.grouping = grouping
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.regroup(targets)

    @property
    def device(self):
        return self.alpha.device

    def to(self, device):
        for name in ("alpha", "exp_avg", "exp_avg_sq", "group", "group_lr", "steps"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def regroup(self, targets):
        """Group the tiles by ``targets`` and start a fresh Adam (moments and step counts 0)."""
        group, label_count = label_groups(targets.detach(), self.grouping)
        lam = torch.ones(1) if self.grouping == "one" else group_lr_coefficients(label_count, self.update_lr)
        self.group = group.to(self.device)
        self.group_lr = (lam.double() * self.lr).to(self.device)
        self.steps = torch.zeros(len(lam), dtype=torch.float64, device=self.device)
        self.exp_avg = torch.zeros_like(self.alpha)
        self.exp_avg_sq = torch.zeros_like(self.alpha)

    def end_epoch(self, targets):
        """After an epoch: ``ulr-adaptive`` with label groups regroups by the current targets and
        restarts Adam, as the reference rebuilt its optimiser. Returns whether it did (the
        reference's rebuild also reset the network's Adam)."""
        if self.update_lr == "ulr-adaptive" and self.grouping != "one":
            self.regroup(targets)
            return True
        return False

    def gather(self, idx):
        """Leaf tensor of the batch's weights; its ``.grad`` is passed to :meth:`step`."""
        return self.alpha[idx].detach().requires_grad_(True)

    @torch.no_grad()
    def step(self, idx, grad, valid=None):
        """One step of the weights' optimiser (:meth:`adam_step` or :meth:`sgd_step`)."""
        if self.optimizer == "sgd":
            self.sgd_step(idx, grad, valid)
        else:
            self.adam_step(idx, grad, valid)

    @torch.no_grad()
    def sgd_step(self, idx, grad, valid=None):
        """``alpha[i] -= lambda_g * lr * (sum of grad rows of i + weight_decay * alpha[i])`` for the
        rows ``i`` in ``idx``; every other row is unchanged. Rows drawn twice have their gradients
        summed; ``valid`` as in :meth:`adam_step`. Masks over all rows: no host synchronisation."""
        g = torch.zeros_like(self.alpha)
        g.index_add_(0, idx, grad.to(g.dtype))
        rows = torch.zeros(len(self.alpha), dtype=torch.bool, device=self.device)
        rows[idx] = True
        if valid is not None:
            rows &= valid
        if self.weight_decay:
            g = g.add(self.alpha, alpha=self.weight_decay)
        lr = self.group_lr.float()[self.group]
        if self.alpha.dim() == 2:
            rows, lr = rows[:, None], lr[:, None]
        self.alpha = torch.where(rows, self.alpha - lr * g, self.alpha)
        active = torch.zeros_like(self.steps, dtype=torch.bool)
        active[self.group[idx]] = True
        if valid is not None:
            active &= valid
        self.steps = self.steps + active  # steps per group with a row in the batch (bookkeeping only)

    @torch.no_grad()
    def adam_step(self, idx, grad, valid=None):
        """One Adam step of every group with a tile among ``idx``, ``grad`` the batch rows' gradients.

        Rows drawn more than once (sampling with replacement) have their gradients summed, as
        for one parameter. ``valid`` (optional 0-dim bool tensor) skips the whole step when
        False without a host sync (a float16 overflow). Runs over all ``T`` rows with masks:
        no data-dependent shapes, so no device synchronisation.
        """
        g = torch.zeros_like(self.alpha)
        g.index_add_(0, idx, grad.to(g.dtype))
        active = torch.zeros_like(self.steps, dtype=torch.bool)
        active[self.group[idx]] = True
        if valid is not None:
            active &= valid
        rows = active[self.group]
        if rows.dim() < self.alpha.dim():
            rows = rows[:, None]
        if self.weight_decay:
            g = g.add(self.alpha, alpha=self.weight_decay)
        b1, b2 = self.betas
        m = torch.lerp(self.exp_avg, g, 1 - b1)
        v = (self.exp_avg_sq * b2).addcmul_(g, g, value=1 - b2)
        steps = self.steps + active
        t = steps.clamp_min(1)  # groups without a step yet: any value, they are masked out
        step_size = (self.group_lr / (1 - b1 ** t)).float()[self.group]
        bc2_sqrt = torch.sqrt(1 - b2 ** t).float()[self.group]
        if self.alpha.dim() == 2:
            step_size, bc2_sqrt = step_size[:, None], bc2_sqrt[:, None]
        denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
        self.alpha = torch.where(rows, self.alpha - step_size * (m / denom), self.alpha)
        self.exp_avg = torch.where(rows, m, self.exp_avg)
        self.exp_avg_sq = torch.where(rows, v, self.exp_avg_sq)
        self.steps = steps

    def state_dict(self):
        return {"alpha": self.alpha.cpu(), "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(),
                "group": self.group.cpu(), "group_lr": self.group_lr.cpu(), "steps": self.steps.cpu(),
                "grouping": self.grouping, "update_lr": self.update_lr, "optimizer": self.optimizer}

    def load_state_dict(self, state):
        if "group" not in state:
            raise UserError("the checkpoint's sample weights come from an older version of this program (no "
                            "per-group optimiser state); start a new run")
        if state["alpha"].shape != self.alpha.shape:
            raise UserError(f"the checkpoint's sample weights have shape {tuple(state['alpha'].shape)} but this data "
                            f"gives {tuple(self.alpha.shape)}; resume with the same data and --granularity")
        saved = (state["grouping"], state["update_lr"], state.get("optimizer", "adam"))
        if saved != (self.grouping, self.update_lr, self.optimizer):
            raise UserError(f"the checkpoint's sample weights were trained with --weightGroups {saved[0]} "
                            f"--updateLR {saved[1]} --weightOptimizer {saved[2]}; resume with the same flags")
        for name in ("alpha", "exp_avg", "exp_avg_sq", "group", "group_lr", "steps"):
            setattr(self, name, state[name].to(self.device))
