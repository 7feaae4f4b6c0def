"""One ANA training epoch and the tile/bag evaluations. Each returns plain numbers or tensors."""
import math
import time

import torch

from models.losses_ana import weighted_bce_loss
from models.pseudo_labels import make_targets
from utils.errors import UserError
from utils.distributed import any_over_processes, gather_from_processes
from utils.fast_path import make_precision
from utils.logger import progress


class BatchPreprocessor:
    """uint8 batch -> normalised float batch on the compute device, with optional flips.

    Doing this on the device for the whole batch keeps the DataLoader workers to reading
    cached tiles only. Training augmentation is a horizontal flip with p=0.5 (as the reference).
    """

    def __init__(self, mean, std, device, memory_format=torch.contiguous_format):
        self.device = device
        self.memory_format = memory_format  # channels-last on a GPU (utils/fast_path.py)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    def __call__(self, x, train=False):
        x = x.to(self.device, non_blocking=True).float()
        if train:
            flip = torch.rand(x.shape[0], 1, 1, 1, device=self.device) < 0.5
            x = torch.where(flip, x.flip(3), x)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def train_one_epoch(model, loader, optimizer, weights, tile_labels, targets, preprocess, *,
                    granularity, training_label, desc="train", precision=None, dist_info=None):
    """Train one epoch; update ``weights`` and the stored per-tile ``targets`` in place.

    ``tile_labels`` [T, C] are the bag labels of each tile; ``targets`` [T, C] receives the
    targets actually used (pseudo/soft labels), which drive the ``ulr-adaptive`` groups.
    Batches whose targets are all zero are skipped (the reference's behaviour). ``precision``
    (:func:`utils.fast_path.make_precision`, default float32): the network's forward runs under
    autocast, the loss (with the instance weights) in float32 from float32 logits.

    Distributed (``dist_info`` of :mod:`utils.distributed`, the model wrapped in DDP): the
    processes' batches together are the one-process batch (see ``InstanceSampler``), so a step
    is skipped only when none of them has a label; the instance-weight gradients, rows and
    targets of all processes are gathered and every process applies all of them, so the learned
    weights stay identical everywhere and take the one-process steps.
    Returns averaged numbers: loss per image, images seen, skipped batches, timings.
    """
    precision = precision or make_precision(preprocess.device, enabled=False)
    scaler = precision.scaler
    distributed = dist_info is not None and dist_info.enabled
    model.train()
    device = preprocess.device
    total_loss, n_images, n_steps, skipped = 0.0, 0, 0, 0
    t_data = 0.0
    start = tic = time.perf_counter()
    for x, idx in progress(loader, desc=desc):
        idx = idx.to(device, non_blocking=True)
        x = preprocess(x, train=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_data += time.perf_counter() - tic
        alpha = weights.gather(idx)
        target = make_targets(tile_labels[idx], alpha, training_label)
        has_label = torch.any(target > 0)
        step_now = has_label if not distributed else any_over_processes(has_label, dist_info)
        if step_now:
            with precision.autocast():
                logits = model(x)
            loss = weighted_bce_loss(logits.float(), target, alpha, granularity)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            loss_value = loss.item()  # the step's one host sync
            if not math.isfinite(loss_value):
                raise UserError(f"the training loss became {loss_value} at step {n_steps}; lower --lr / --weight_lr")
            # float16: the weights' gradient is scaled like the network's; unscale it by hand
            # (the GradScaler only knows the network's optimizer) and skip both on overflow
            inv_scale = 1.0 / scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(optimizer)
            scaler.update()
            alpha_grad = alpha.grad * inv_scale if inv_scale != 1.0 else alpha.grad
            rows = idx
            if distributed:  # every process applies every process's rows: the global batch's
                rows, alpha_grad, target = gather_from_processes((idx, alpha_grad, target), dist_info)
            targets[rows] = target
            if not scaler.is_enabled() or torch.isfinite(alpha_grad).all():
                weights.step(rows, alpha_grad)
            total_loss += loss_value
            n_images += len(idx)
            n_steps += 1
        else:
            skipped += 1
        tic = time.perf_counter()
    elapsed = time.perf_counter() - start
    return {"loss": total_loss / max(n_images, 1), "images": n_images, "steps": n_steps,
            "skipped_batches": skipped, "time_data": t_data, "time_compute": elapsed - t_data,
            "images_per_s": n_images / max(elapsed, 1e-9)}


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
