"""One ANA training epoch and the tile/bag evaluations. Each returns plain numbers or tensors."""
import time
from dataclasses import dataclass

import torch

from models.losses_ana import weighted_bce_loss
from models.pseudo_labels import make_targets
from models.sample_weights import ALL_ZERO_ERROR, sampler_weights
from utils.distributed import any_over_processes, gather_from_processes
from utils.errors import UserError
from utils.logger import progress
from utils.precision import make_precision


class BatchPreprocessor:
    """uint8 batch -> normalised float batch on the compute device, with optional flips.

    Doing this on the device for the whole batch keeps the DataLoader workers to reading
    cached tiles only. Training augmentation is a horizontal flip with p=0.5 (as the reference).
    """

    def __init__(self, mean, std, device, memory_format=torch.contiguous_format):
        self.device = device
        self.memory_format = memory_format  # channels-last on a GPU (utils/precision.py)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    def __call__(self, x, train=False):
        x = x.to(self.device, non_blocking=True).float()
        if train:
            flip = torch.rand(x.shape[0], 1, 1, 1, device=self.device) < 0.5
            x = torch.where(flip, x.flip(3), x)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


@dataclass(kw_only=True)
class EpochSetup:
    """What one ANA training epoch needs, built once by the run (main.py's ``build``).

    ``model`` is the network as trained (DDP or compiled wrapper); ``optimizer`` the network's
    Adam; ``weights`` the instance weights (:class:`models.sample_weights.InstanceWeights`);
    ``loader`` yields ``(uint8 tiles, tile indices)``; ``tile_labels`` [T, C] are each tile's
    bag labels and ``targets`` [T, C] receives the targets used (pseudo/soft labels);
    ``preprocess`` a :class:`BatchPreprocessor`. ``sampler`` (an
    :class:`datasets.samplers.InstanceSampler`, needed by :func:`train_epoch`) draws the tiles;
    ``sampler_probs`` holds its current probabilities, recomputed every ``resample_every``
    epochs (and saved in checkpoints). ``precision`` (:func:`utils.precision.make_precision`,
    default float32); ``dist_info`` (:mod:`utils.distributed`, default one process).
    """
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    weights: object
    loader: object
    tile_labels: torch.Tensor
    targets: torch.Tensor
    preprocess: object
    sampler: object = None
    precision: object = None
    granularity: str = "label"
    training_label: str = "real"
    sampling: bool = False
    resample_every: int = 1
    reset_optimizer: bool = True
    dist_info: object = None
    sampler_probs: torch.Tensor = None


def train_epoch(setup, epoch):
    """One epoch as ``main.py`` / ``main_single.py`` run it, as the reference's epoch loop did:

    1. the sampler's probabilities from the current weights (on epochs 1, 1 + N, 1 + 2N, ...
       for ``resample_every`` N), drawn from with ``sampling`` (which raises a
       :class:`UserError` when every weight is zero: nothing could be drawn), else a plain
       shuffle;
    2. :func:`train_one_epoch`;
    3. :func:`end_epoch` (the ``ulr-adaptive`` regrouping and optimiser restart).
    Returns the statistics of :func:`train_one_epoch` plus ``restarted`` and ``all_zero``
    (every weight in use was zero at the start of the epoch: the loss then holds only the
    negative labels, as in the reference, which trained on without ``--sampling``).
    """
    if setup.sampler_probs is None or (epoch - 1) % setup.resample_every == 0:
        setup.sampler_probs = sampler_weights(setup.weights.alpha, setup.tile_labels, strict=False)
    all_zero = not bool(torch.any(setup.sampler_probs > 0))
    if setup.sampling and all_zero:
        raise UserError(ALL_ZERO_ERROR)
    setup.sampler.set_epoch(epoch)
    setup.sampler.set_weights(setup.sampler_probs if setup.sampling else None)
    stats = train_one_epoch(setup, desc=f"epoch {epoch} train")
    stats["restarted"] = end_epoch(setup.weights, setup.targets, setup.optimizer, setup.reset_optimizer)
    stats["all_zero"] = all_zero
    return stats


def train_one_epoch(setup, *, desc="train"):
    """Train one epoch over ``setup.loader`` (an :class:`EpochSetup`); update ``setup.weights``
    and the stored per-tile ``setup.targets`` in place.

    ``tile_labels`` [T, C] are the bag labels of each tile; ``targets`` [T, C] receives the
    targets actually used (pseudo/soft labels), which drive the ``ulr-adaptive`` groups.
    The loss is that of ``granularity`` on the targets of ``training_label``.
    A batch whose tiles have no label at all is skipped (the reference's ``label.sum() == 0``).
    ``precision`` (:func:`utils.precision.make_precision`, default float32): the network's
    forward runs under autocast, the loss (with the instance weights) in float32.

    No host synchronisation per step on one process: the skip test reads the CPU copy of the
    labels, the loss is summed on the device, and a non-finite loss is reported at the end of
    the epoch (naming its first step). A float16 ``GradScaler`` still synchronises in its own
    ``step``.

    Distributed (``dist_info`` of :mod:`utils.distributed`, the model wrapped in DDP): the
    processes' batches together are the one-process batch (see ``InstanceSampler``), so a step
    is skipped only when none of them has a label (one small all-reduce per step); the
    instance-weight gradients, rows and targets of all processes are gathered and every process
    applies all of them, so the learned weights stay identical everywhere and take the
    one-process steps.
    Returns averaged numbers: loss per image, images seen, steps, skipped batches, images/s.
    """
    model, loader, optimizer, weights = setup.model, setup.loader, setup.optimizer, setup.weights
    tile_labels, targets, preprocess, dist_info = setup.tile_labels, setup.targets, setup.preprocess, setup.dist_info
    precision = setup.precision or make_precision(preprocess.device, enabled=False)
    scaler = precision.scaler
    distributed = dist_info is not None and dist_info.enabled
    model.train()
    device = preprocess.device
    labels_cpu = tile_labels.cpu() > 0
    step_losses, n_images, skipped = [], 0, 0
    start = time.perf_counter()
    for x, idx in progress(loader, desc=desc):
        has_label = bool(labels_cpu[idx].any())
        if distributed:
            has_label = any_over_processes(torch.tensor(has_label, device=device), dist_info)
        if not has_label:
            skipped += 1
            continue
        idx = idx.to(device, non_blocking=True)
        x = preprocess(x, train=True)
        alpha = weights.gather(idx)
        target = make_targets(tile_labels[idx], alpha, setup.training_label)
        with precision.autocast():
            logits = model(x)
        loss = weighted_bce_loss(logits.float(), target, alpha, setup.granularity)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        # float16: the weights' gradient is scaled like the network's; unscale it by hand
        # (the GradScaler only knows the network's optimizer) and skip both on overflow
        alpha_grad = alpha.grad / scaler.get_scale() if scaler.is_enabled() else alpha.grad
        scaler.step(optimizer)
        scaler.update()
        rows = idx
        if distributed:  # every process applies every process's rows: the global batch's
            rows, alpha_grad, target = gather_from_processes((idx, alpha_grad, target), dist_info)
        targets[rows] = target
        weights.step(rows, alpha_grad, valid=torch.isfinite(alpha_grad).all() if scaler.is_enabled() else None)
        step_losses.append(loss.detach())
        n_images += len(idx)
    elapsed = time.perf_counter() - start
    total_loss = 0.0
    if step_losses:
        losses = torch.stack(step_losses)
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            raise UserError(f"the training loss became {losses[first].item()} at step {first} of {desc}; "
                            f"lower --lr / --weight_lr")
        total_loss = losses.double().sum().item()
    return {"loss": total_loss / max(n_images, 1), "images": n_images, "steps": len(step_losses),
            "skipped_batches": skipped, "images_per_s": n_images / max(elapsed, 1e-9)}


def end_epoch(weights, targets, optimizer, reset_optimizer=True):
    """What the reference did after each training epoch: with ``ulr-adaptive`` it regrouped the
    tiles by their current targets and built a new Adam for the network and the weights. The
    weights' optimiser always restarts then (:meth:`InstanceWeights.end_epoch`); the network's
    Adam state is cleared with ``reset_optimizer`` (the default; ``--no-resetOptimizer`` keeps
    it). Returns whether a restart happened."""
    restarted = weights.end_epoch(targets)
    if restarted and reset_optimizer:
        optimizer.state.clear()
    return restarted


@torch.no_grad()
def predict(model, loader, preprocess, desc="eval", precision=None):
    """Sigmoid probabilities [n, C] (on the CPU) for every tile of ``loader``, in order."""
    precision = precision or make_precision(preprocess.device, enabled=False)
    model.eval()
    out = []
    for x, _ in progress(loader, desc=desc):
        with precision.autocast():
            logits = model(preprocess(x))
        out.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(out)


def bag_max(tile_probs, tile_bag, num_bags):
    """Bag probabilities: the maximum over each bag's tiles, per class (paper Eq. 7)."""
    index = tile_bag.view(-1, 1).expand_as(tile_probs)
    out = torch.zeros(num_bags, tile_probs.shape[1], dtype=tile_probs.dtype)
    return out.scatter_reduce(0, index, tile_probs, reduce="amax", include_self=False)
