"""One CryoEM PU + Selective FixMatch training epoch, and the evaluation pass.

A training step (nnPU: Kiryo et al. 2017; FixMatch: Sohn et al. 2020), for a batch ``x`` [B, 1, S, S] with
``is_positive`` [B] drawn by :class:`datasets.cryoem_dataset_pu.PUBatchSampler`:

1. ``weak = weak_augment(x)``; ``strong = strong_augment(x[U])`` for the unlabelled samples U
   (every sample when ``selective`` is false: standard FixMatch);
2. teacher probabilities ``q = sigmoid(teacher(weak[U]))`` without gradients (the EMA teacher
   in eval mode; with ``use_ema`` off the student's own detached weak logits, as FixMatch);
3. one student forward of ``cat(weak, strong)`` (BatchNorm sees both views, as in FixMatch);
4. ``L = L_nnPU(z_weak) + w_cons(e) * L_cons(z_strong, q) + w_ent(e) * L_ent(z_weak[U])`` where
   the nnPU term is its *objective* (``-gamma * r`` on the non-negative correction branch);
5. backward, gradient clipping, Adam step, per-iteration cosine step, EMA teacher update.

Metrics are accumulated on the device and read back a few times per epoch only (every
``sync_every`` steps and at the end), so the GPU never waits for the host between steps.
"""
import time
from dataclasses import dataclass

import torch

from datasets.cryoem_augment import MAX_SHIFT_FRACTION, strong_augment, weak_augment
from models.losses_pu import (consistency_weight, entropy_loss, entropy_weight, nnpu_loss,
                              selective_consistency_loss)
from utils.errors import UserError
from utils.logger import progress
from utils.metrics import binary_metrics
from utils.precision import make_precision

# Per-step quantities averaged over the epoch (the keys of train_one_epoch's result, with
# mask_rate / pseudo_positive_rate / nn_correction_rate computed from counts instead).
_STEP_MEANS = ("loss", "objective", "pu_loss", "loss_pos", "loss_neg", "consistency_loss", "entropy_loss")


@dataclass(frozen=True)
class StepParams:
    """The config values one training step needs (see :meth:`from_config`)."""

    prior: float
    nnpu_beta: float = 0.0
    nnpu_gamma: float = 1.0
    consistency_threshold: float = 0.95
    selective: bool = True
    lambda_consistency: float = 1.0
    lambda_entropy: float = 0.01
    rampup_epochs: int = 10
    entropy_start_epoch: int = 10
    entropy_rampup_epochs: int = 10
    grad_clip: float = 1.0
    shift_fraction: float = MAX_SHIFT_FRACTION  # augmentation shift, of the stored patch side

    @classmethod
    def from_config(cls, cfg, prior):
        """From a resolved config (utils.cryoem.config); ``prior`` is the resolved class prior
        (``loss.prior``, or the data's metadata prior when the config says ``auto``)."""
        loss, training = cfg["loss"], cfg["training"]
        return cls(prior=float(prior), nnpu_beta=loss["nnpu_beta"], nnpu_gamma=loss["nnpu_gamma"],
                   consistency_threshold=loss["consistency_threshold"], selective=loss["selective"],
                   lambda_consistency=loss["lambda_consistency"], lambda_entropy=loss["lambda_entropy"],
                   rampup_epochs=training["rampup_epochs"], entropy_start_epoch=training["entropy_start_epoch"],
                   entropy_rampup_epochs=training["entropy_rampup_epochs"], grad_clip=training["grad_clip"])

    def weights(self, epoch_index):
        """``(w_cons, w_ent)`` of the 0-based epoch ``epoch_index`` (the linear ramps of the config's ``training`` keys)."""
        return (consistency_weight(epoch_index, self.lambda_consistency, self.rampup_epochs),
                entropy_weight(epoch_index, self.lambda_entropy, self.entropy_start_epoch,
                               self.entropy_rampup_epochs))


@dataclass
class EpochSetup:
    """What a training epoch works with (built once per run by train_pu_selective_fixmatch.py).

    ``model``: the student as trained (possibly DDP-wrapped or compiled); ``teacher``: the
    :class:`~models.fixmatch_pu.EMATeacher`; ``loader``: the training loader (a
    :class:`~datasets.cryoem_dataset_pu.PUBatchSampler`'s batches); ``scheduler`` steps once per
    iteration; ``params``: the :class:`StepParams`; ``precision`` (:func:`utils.precision.make_precision`;
    None = float32) runs the forward passes under autocast and scales the loss for float16;
    ``memory_format`` (channels-last on a GPU) is applied to the batches.
    """

    model: torch.nn.Module
    teacher: object
    loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: StepParams
    device: torch.device
    precision: object = None
    memory_format: torch.memory_format = torch.contiguous_format


def augmentation_generator(device, seed, epoch_index):
    """The augmentation RNG of one epoch, seeded by (seed, 0-based ``epoch_index``): a resumed run
    draws the same views."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch_index)) % (2**63 - 1))
    return generator


def train_one_epoch(setup, epoch, *, generator=None, desc="train", sync_every=50):
    """Train ``setup.model`` for one pass of ``setup.loader``; update ``setup.teacher`` after each step.

    ``setup`` is an :class:`EpochSetup`; ``epoch`` is 1-based (epoch ``e`` is at ``e - 1`` on the
    ramps of :meth:`StepParams.weights`); ``generator`` (on the device, optional) drives the
    augmentations. A non-finite loss raises :class:`UserError` naming the epoch and step (the
    previous epoch's ``last.pt`` stays intact).

    Returns epoch means: ``loss`` (reported total: nnPU loss + weighted consistency + weighted
    entropy), ``objective`` (the minimised total), ``pu_loss``, ``loss_pos`` (pi * R_p+),
    ``loss_neg`` (r = R_u- - pi * R_p-), ``consistency_loss``, ``entropy_loss`` (unweighted),
    ``mask_rate`` (confident unlabelled / unlabelled), ``pseudo_positive_rate`` (pseudo-label 1
    among the confident unlabelled; NaN when none), ``nn_correction_rate`` (fraction of steps on
    the nnPU correction branch, r < -beta), ``consistency_weight``, ``entropy_weight``, ``lr``
    (mean over the steps), ``patches_per_s``, ``steps``, ``patches``, ``seconds``.
    """
    student, teacher, optimizer, scheduler = setup.model, setup.teacher, setup.optimizer, setup.scheduler
    params, device, memory_format = setup.params, setup.device, setup.memory_format
    loader = setup.loader
    precision = setup.precision or make_precision(device, enabled=False)
    scaler = precision.scaler
    student.train()
    if teacher.enabled:
        teacher.model.eval()
    w_cons, w_ent = params.weights(epoch - 1)
    sums = torch.zeros(len(_STEP_MEANS), dtype=torch.float64, device=device)
    # counts: unlabelled seen, confident unlabelled, confident pseudo-positive unlabelled, correction steps
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    lr_sum, n_steps, n_patches = 0.0, 0, 0
    start = time.perf_counter()
    for x, is_positive, _ in progress(loader, desc=desc):
        x = x.to(device, non_blocking=True).float()
        is_positive = is_positive.to(device, non_blocking=True).bool()
        unlabelled = ~is_positive
        selected = unlabelled if params.selective else torch.ones_like(is_positive)
        n = x.shape[0]

        # augmentation in float32 on the batch's device (the GPU when training there)
        weak = weak_augment(x, generator=generator, shift_fraction=params.shift_fraction)
        strong = strong_augment(x[selected], generator=generator, shift_fraction=params.shift_fraction)
        with precision.autocast():
            logits = student(torch.cat([weak, strong]).contiguous(memory_format=memory_format)).float()
        logits_weak, logits_strong = logits[:n], logits[n:]
        if teacher.enabled:
            with torch.no_grad(), precision.autocast():
                teacher_probs = torch.sigmoid(teacher.model(weak[selected].contiguous(memory_format=memory_format))
                                              .float())
        else:  # the student labels itself (FixMatch without EMA)
            teacher_probs = torch.sigmoid(logits_weak.detach()[selected].float())

        pu = nnpu_loss(logits_weak, is_positive, params.prior, beta=params.nnpu_beta, gamma=params.nnpu_gamma)
        cons = selective_consistency_loss(logits_strong, teacher_probs, is_positive[selected],
                                          threshold=params.consistency_threshold, selective=params.selective)
        ent = entropy_loss(logits_weak, is_positive)
        objective = pu["objective"] + w_cons * cons["loss"] + w_ent * ent

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        if params.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(student.parameters(), params.grad_clip)
        lr_sum += optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)  # skipped by the scaler when a float16 gradient overflowed
        scaler.update()
        scheduler.step()
        teacher.update(student)

        with torch.no_grad():
            reported = pu["loss"] + w_cons * cons["loss"] + w_ent * ent
            step = torch.stack([reported, objective, pu["loss"], pu["loss_pos"], pu["loss_neg"],
                                cons["loss"], ent]).detach().double()
            sums += step
            mask = cons["mask"].bool() & unlabelled[selected]  # confident unlabelled samples
            confident_pos = mask & (teacher_probs >= 0.5)
            counts += torch.stack([unlabelled.sum(), mask.sum(), confident_pos.sum(),
                                   (pu["loss_neg"].detach() < -params.nnpu_beta).sum()]).double()
            bad = ~torch.isfinite(step[:2]).all()
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, n_steps), first_bad)
        n_steps += 1
        n_patches += n
        if n_steps % sync_every == 0:
            _raise_if_bad(int(first_bad), epoch)
    _raise_if_bad(int(first_bad), epoch)
    seconds = time.perf_counter() - start
    if n_steps == 0:
        raise UserError("the training loader gave no batch (empty training set?)")
    sums, counts = sums.cpu(), counts.cpu()  # the epoch's one read-back (besides the periodic checks)
    out = {key: float(sums[i]) / n_steps for i, key in enumerate(_STEP_MEANS)}
    n_unl, n_mask, n_conf_pos, n_corr = (float(c) for c in counts)
    out.update({
        "mask_rate": n_mask / n_unl if n_unl else float("nan"),
        "pseudo_positive_rate": n_conf_pos / n_mask if n_mask else float("nan"),
        "nn_correction_rate": n_corr / n_steps,
        "consistency_weight": float(w_cons), "entropy_weight": float(w_ent),
        "lr": lr_sum / n_steps, "patches_per_s": n_patches / max(seconds, 1e-9),
        "steps": n_steps, "patches": n_patches, "seconds": seconds,
    })
    return out


def _raise_if_bad(first_bad, epoch):
    if first_bad >= 0:
        raise UserError(f"the training loss became non-finite (NaN or inf) in epoch {epoch}, "
                        f"step {first_bad + 1}; lower training.learning_rate (e.g. to 0.0003) or set training.grad_clip > 0 "
                        f"and start a new run (--exp-name); last.pt of the previous epoch is intact")


def evaluation_metrics(labels, probs, threshold=0.5):
    """:func:`utils.metrics.binary_metrics` of an evaluation pass; None for an empty set."""
    if labels.numel() == 0:
        return None
    if not torch.isfinite(probs).all():
        raise UserError("the model's predictions became non-finite (NaN); lower training.learning_rate "
                        "and start a new run (--exp-name)")
    return binary_metrics(labels.numpy(), probs.numpy(), threshold=threshold)


@torch.no_grad()
def evaluate(model, loader, device, desc="eval", precision=None, memory_format=torch.contiguous_format):
    """``(labels, probs)``: float CPU tensors [N] of ``loader``'s 0/1 labels and ``sigmoid(model(x))``.

    ``model`` runs in eval mode (dropout off, BatchNorm running statistics); no augmentation;
    ``precision`` / ``memory_format`` as in :func:`train_one_epoch`.
    """
    precision = precision or make_precision(device, enabled=False)
    was_training = model.training
    model.eval()
    labels, probs = [], []
    for x, y, _ in progress(loader, desc=desc):
        x = x.to(device, non_blocking=True).float().contiguous(memory_format=memory_format)
        with precision.autocast():
            logits = model(x)
        probs.append(torch.sigmoid(logits.float()).cpu())
        labels.append(y.float().reshape(-1))
    model.train(was_training)
    if not probs:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(labels), torch.cat(probs)
