"""The CryoEM PU + Selective FixMatch training run behind ``train_pu_selective_fixmatch.py``.

``run(cfg, args)`` takes a resolved config (utils.cryoem.config) and the parsed command line
(``exp_name``, ``output_dir``, ``resume``) and trains:

  check inputs (config, run directory, checkpoint, data, sampler, model) -> write the run
  directory -> epochs of train (utils.cryoem.epoch) / evaluate the EMA teacher on val ->
  ``best_model.pt`` (best val AUC), ``last.pt`` (everything --resume needs) -> test with the best
  teacher -> ``results.json``.

Everything that can be wrong with the user's input is checked before the run directory is
created or touched, so a bad command never damages an existing run.

Run directory ``<output-dir>/<exp-name>/``: ``config.yaml`` (resolved config), ``train.log``
(appended; git revision, device, torch version, config, one line per epoch), TensorBoard
events (``train/*`` and ``val/*`` scalars of the EMA teacher, plus ``val/student_auc``; step = 1-based
epoch), ``best_model.pt``,
``last.pt`` and ``results.json``.
"""
import dataclasses
import functools
import json
import logging
import math
from pathlib import Path

import torch

from datasets.cryoem_dataset_pu import PUBatchSampler, load_pu_data
from models.fixmatch_pu import EMATeacher, FixMatchPUModel, unwrap_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.cryoem.config import dump_config
from utils.cryoem.epoch import StepParams, evaluate, train_one_epoch
from utils.device import resolve_device
from utils.distributed import (DistInfo, barrier, broadcast_object, cleanup_distributed, init_distributed,
                               mean_over_processes, replicas_in_sync, wrap_ddp)
from utils.early_stopping import EarlyStopping
from utils.errors import UserError
from utils.io import to_json_safe, write_json
from utils.logger import NullSummaryWriter, make_summary_writer
from utils.metrics import binary_metrics
from utils.picking.peaks import prior_threshold
from utils.precision import configure_backends, make_precision, maybe_compile, memory_format
from utils.run import (check_global_batch, claim_run_dir, fast_path_line, finished_line, main_only, open_run,
                       restore_scaler)
from utils.seed import rng_state, seed_everything, seeded_loader, set_rng_state

# Config keys a resumed run may change; any other difference from last.pt's config is refused
# (it would silently mix two experiments in one run directory).
RESUMABLE_CHANGES = ("data.data_dir", "data.num_workers", "data.max_open_chunks", "training.epochs",
                     "training.early_stopping_patience", "training.device", "training.amp",
                     "training.channels_last", "training.compile", "training.deterministic")
LAST_KEYS = ("epoch", "student", "teacher", "optimizer", "scheduler", "best_auc", "best_epoch",
             "early_stopping", "split", "rng_state", "config", "stopped")
# Train metrics written to TensorBoard (train/<key>) each epoch.
TRAIN_SCALARS = ("loss", "objective", "loss_pos", "loss_neg", "consistency_loss", "entropy_loss", "mask_rate",
                 "pseudo_positive_rate", "consistency_weight", "entropy_weight", "lr", "nn_correction_rate",
                 "patches_per_s")
VAL_SCALARS = ("auc", "ap", "f1", "precision", "recall", "best_f1", "best_f1_threshold")


# ----------------------------------------------------------------------------- small helpers

class _RecordBuffer(logging.Handler):
    """Keeps log records until the run's logger exists (nothing is written before the checks pass)."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _buffer_logger():
    logger = logging.Logger("cryoem.setup")  # unregistered: nothing global is created per run
    logger.setLevel(logging.INFO)
    buffer = _RecordBuffer()
    logger.addHandler(buffer)
    return logger, buffer


def _flatten(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _fmt(value, spec=".4f"):
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _data_context(data):
    """``metadata.context`` of the data (px of surroundings around the classified window; 0 when absent)."""
    context = data.metadata.get("context", 0) if isinstance(data.metadata, dict) else 0
    if isinstance(context, bool) or not isinstance(context, int) or context < 0 or context % 32 \
            or data.patch_size - 2 * context < 32:
        raise UserError(f"{data.files[0] if data.files else 'the data'}: metadata.context is {context!r}, expected a "
                        f"multiple of 32 px leaving a window of at least 32 px in the {data.patch_size} px patches")
    return context


def _heldout_note(data):
    """"; val is a positive-vs-unlabelled hold-out" (and/or test), or "" when both are labelled sets."""
    names = [name for name in ("val", "test") if getattr(data, name) is not None and getattr(data, name).heldout]
    if not names:
        return ""
    return f"; {'/'.join(names)} {'are' if len(names) > 1 else 'is a'} positive-vs-unlabelled hold-out" \
        + ("s" if len(names) > 1 else "")


# The documented default of loss.prior when the data hold no estimate (README, CryoEM "Config").
DOCUMENTED_PRIOR = 0.3


def _resolve_prior(cfg, data):
    """``(prior, note)``: ``loss.prior``, or for ``auto`` the data's ``metadata.prior``; note is None,
    or a warning for the log when the data hold no prior and the documented default 0.3 is used.

    Training data written by other tools (``preprocessed_data.pt``) need not carry a prior; a ``metadata.prior`` that is present but not a
    number in (0, 1) is an error (a broken file, not a missing estimate).
    """
    prior = cfg["loss"]["prior"]
    if prior != "auto":
        return float(prior), None
    source = data.files[0] if data.files else "data.data_dir"
    meta = data.metadata.get("prior") if isinstance(data.metadata, dict) else None
    if meta is None:
        return DOCUMENTED_PRIOR, (
            f"WARNING: loss.prior is 'auto' but the data in {source} hold no metadata.prior (no estimate from "
            f"preprocess_cryoem.py): using {DOCUMENTED_PRIOR:g}, the documented default, NOT an estimate of this "
            f"data's prior; the nnPU risk and the picking threshold depend on it: set loss.prior in the YAML config "
            f"or pass --prior P (e.g. --prior 0.1)")
    if not isinstance(meta, (int, float)) or isinstance(meta, bool) or not 0.0 < meta < 1.0:
        raise UserError(f"loss.prior is 'auto' but the data in {source} "
                        f"has metadata.prior {meta!r}, expected a number in (0, 1); set loss.prior to a number")
    return float(meta), None


def _prior_mismatch(prior, data):
    """A warning when a configured prior is more than 2x off the data's own estimate, else None."""
    meta = data.metadata.get("prior") if isinstance(data.metadata, dict) else None
    if not isinstance(meta, (int, float)) or isinstance(meta, bool) or not 0 < meta < 1:
        return None
    if max(prior / meta, meta / prior) <= 2:
        return None
    return (f"WARNING: loss.prior {prior:g} is {max(prior / meta, meta / prior):.1f}x off the prior the data in "
            f"{data.files[0] if data.files else 'data.data_dir'} was made with ({meta:.4g}); the nnPU risk and the "
            f"picking threshold depend on it: set loss.prior: auto to use the data's")


def _check_resume_config(saved, cfg, last_path):
    """Refuse a resume whose config differs from last.pt's in anything but RESUMABLE_CHANGES."""
    old, new = _flatten(saved), _flatten(cfg)
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES:
            continue
        if old.get(key) != new.get(key):
            raise UserError(f"--resume: {key} is {new.get(key)!r} but the run in {last_path.parent} was trained with "
                            f"{old.get(key)!r}; a resumed run keeps its configuration (only "
                            f"{', '.join(RESUMABLE_CHANGES)} may change); use another --exp-name for a new run")


def _aug_generator(device, seed, epoch_index):
    """The augmentation RNG of one epoch, seeded by (seed, epoch): a resumed run draws the same views."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch_index)) % (2**63 - 1))
    return generator


def _metrics(labels, probs, threshold=0.5):
    """binary_metrics of an evaluation pass; None for an empty set."""
    if labels.numel() == 0:
        return None
    if not torch.isfinite(probs).all():
        raise UserError("the model's predictions became non-finite (NaN); lower training.learning_rate "
                        "and start a new run (--exp-name)")
    return binary_metrics(labels.numpy(), probs.numpy(), threshold=threshold)


def _set_cosine_total(scheduler, total_steps, step):
    """Stretch the per-iteration cosine schedule to ``total_steps`` (a resume with a new --epochs),
    continuing at ``step``: ``lr = eta_min + (lr0 - eta_min) (1 + cos(pi step / T)) / 2``."""
    scheduler.T_max = total_steps
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        lr = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / total_steps)) / 2
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def data_counts(data, prior):
    """The ``data`` entry of results.json: sizes of the splits and what the metrics mean."""
    def labelled(ds):
        labels = getattr(ds, "labels", None)
        n = len(ds)
        return n, int(labels.sum().item()) if labels is not None and n else 0

    n_val, n_val_pos = labelled(data.val)
    n_test, n_test_pos = labelled(data.test)
    return {"n_train_positive": int(data.n_pos), "n_train_unlabeled": int(data.n_unl),
            "n_val": n_val, "n_val_positive": n_val_pos, "n_test": n_test, "n_test_positive": n_test_pos,
            "patch_size": int(data.patch_size), "n_files": len(data.files), "prior": prior,
            "heldout": bool(data.heldout)}


# ----------------------------------------------------------------------------- the run

def run(cfg, args):
    """Train (or resume, or finish) the run ``<args.output_dir>/<args.exp_name>``; return results.json's dict
    plus ``run_dir``. ``cfg`` is a validated, resolved config; ``args`` needs ``exp_name``,
    ``output_dir`` and ``resume`` (and may give ``command``, the shell command that resumes the run,
    for the Ctrl-C message)."""
    run_dir = Path(args.output_dir) / args.exp_name
    last_path = run_dir / "last.pt"
    lock = claim_run_dir(run_dir, "run directory (--output-dir/--exp-name)", hint="or choose another --exp-name")
    # a run killed in its first epoch left its config and log but no last.pt: --resume starts it afresh
    attempted = (run_dir / "config.yaml").is_file() or (run_dir / "train.log").is_file()
    if args.resume and not last_path.is_file() and not attempted:
        raise UserError(f"--resume: {last_path} does not exist (nothing to resume; drop --resume to start a new run)")
    if not args.resume and last_path.is_file():
        raise UserError(f"run directory {run_dir} already holds a run ({last_path.name}); pass --resume to continue "
                        f"it or choose another --exp-name")
    state = None
    if args.resume and last_path.is_file():
        state = load_checkpoint(last_path, expected=("cryoem-run",), flag="--resume:")
        missing = [k for k in LAST_KEYS if k not in state]
        if missing:
            raise UserError(f"{last_path} is not a checkpoint of this trainer (missing {', '.join(missing)})")
        _check_resume_config(state["config"], cfg, last_path)

    device = resolve_device(cfg["training"]["device"])
    info, device = init_distributed(device)  # torchrun: one process per GPU (or gloo on the CPU)
    try:
        return _run(cfg, args, state, run_dir, lock, device, info)
    finally:
        cleanup_distributed(info)


def _run(cfg, args, state, run_dir, lock, device, info):
    seed = cfg["training"]["seed"]
    seed_everything(seed)
    setup_log, buffer = _buffer_logger()
    data_cfg = cfg["data"]
    data = load_pu_data(data_cfg["data_dir"], val_fraction=data_cfg["val_fraction"],
                        test_fraction=data_cfg["test_fraction"], seed=seed,
                        max_open_chunks=data_cfg["max_open_chunks"],
                        split=state["split"] if state is not None else None, logger=setup_log)
    prior, fallback = _resolve_prior(cfg, data)
    for warning in (fallback, _prior_mismatch(prior, data)):
        if warning:
            setup_log.warning(warning)
    # training.batch_size is the global batch: each of the W processes takes batch_size / W
    # patches per step, so W processes take the same steps as one (up to per-process BatchNorm)
    batch_size = cfg["training"]["batch_size"]
    check_global_batch(batch_size, info, "training.batch_size")
    try:
        sampler = PUBatchSampler(data.n_pos, data.n_unl, batch_size // info.world_size,
                                 ratio=tuple(data_cfg["batch_ratio"]), seed=seed,
                                 num_replicas=info.world_size, rank=info.rank)
    except UserError as exc:
        if not info.enabled:
            raise
        raise UserError(f"{exc} (per process: training.batch_size / {info.world_size} processes)") from None
    model_cfg = cfg["model"]
    student = FixMatchPUModel(model_cfg["backbone"], dropout=model_cfg["dropout"],
                              pretrained=model_cfg["pretrained"], context=_data_context(data)).to(device)
    if state is not None:  # a last.pt that does not fit is refused before the run directory changes
        _load_student(student, state, cfg, run_dir)

    # every input is checked: from here on the main process writes the run directory
    with open_run(run_dir, lock, info, "train.log", device, "--resume", cfg["training"]["epochs"],
                  getattr(args, "command", None)) as logger:
        if args.resume and state is None:
            logger.info(f"--resume: no last.pt in {run_dir}: the previous attempt stopped before its first epoch "
                        f"ended; starting afresh at epoch 1")
        logger.info("config " + json.dumps(cfg, sort_keys=False))
        for record in buffer.records:
            logger.handle(record)
        if info.is_main:
            dump_config(cfg, run_dir / "config.yaml")
        return _train(cfg, state, device, data, prior, sampler, student, run_dir, logger,
                      lambda step: make_summary_writer(run_dir, purge_step=step), info)


class _LazyWriter:
    """Creates the SummaryWriter on first use, so a finished run that is resumed gets no new event file."""

    def __init__(self, factory, purge_step):
        self.factory, self.purge_step, self.writer = factory, purge_step, None

    def add_scalar(self, tag, value, step):
        if self.writer is None:
            self.writer = self.factory(self.purge_step)
        self.writer.add_scalar(tag, value, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


@dataclasses.dataclass
class _Parts:
    """What the CryoEM loop trains with (built by :func:`_build`)."""
    train_model: torch.nn.Module
    teacher: EMATeacher
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: StepParams
    precision: object
    fmt: torch.memory_format
    loaders: dict
    total_steps: int


def _build(cfg, device, data, prior, sampler, student, logger, info):
    """Fast path, teacher, optimiser, cosine schedule, step parameters and loaders of a run."""
    training, model_cfg, data_cfg = cfg["training"], cfg["model"], cfg["data"]
    # GPU fast path (utils/precision.py; all no-ops on the CPU): channels-last weights before the
    # teacher copies them, autocast + GradScaler, cuDNN autotuning, optional torch.compile
    fmt = memory_format(device, training["channels_last"])
    student.to(memory_format=fmt)
    precision = make_precision(device, training["amp"])
    backends = configure_backends(device, training["deterministic"])
    train_model = maybe_compile(wrap_ddp(student, info, device), training["compile"])
    logger.info(fast_path_line(precision, fmt, training["compile"], backends))
    teacher = EMATeacher(student, decay=model_cfg["ema_decay"], enabled=model_cfg["use_ema"])
    # the fused kernel: one pass over all parameters (on the CPU ~50x faster than the per-tensor loop)
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.Adam(student.parameters(), lr=training["learning_rate"],
                                 weight_decay=training["weight_decay"], **fused)
    total_steps = training["epochs"] * len(sampler)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=training["min_lr"])
    params = StepParams.from_config(cfg, prior)
    window = data.patch_size - 2 * unwrap_model(student).context
    if window != data.patch_size:  # shift the particle by up to window/8, not (window + context)/8
        params = dataclasses.replace(params, shift_fraction=params.shift_fraction * window / data.patch_size)
        logger.info(f"context {unwrap_model(student).context} px around a {window} px window: augmentation shifts "
                    f"up to {params.shift_fraction * data.patch_size:g} px per axis (the window's 1/8)")
    loader = functools.partial(seeded_loader, device=device, num_workers=data_cfg["num_workers"], seed=training["seed"])
    loaders = {"train": loader(data.train, batch_sampler=sampler)}
    for split in ("val", "test"):
        dataset = getattr(data, split)
        loaders[split] = loader(dataset, batch_size=2 * training["batch_size"]) if len(dataset) else None
    return _Parts(train_model, teacher, optimizer, scheduler, params, precision, fmt, loaders, total_steps)


def _load_student(student, state, cfg, run_dir):
    try:
        student.load_state_dict(state["student"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{run_dir / 'last.pt'} does not fit model.backbone {cfg['model']['backbone']} "
                        f"({type(exc).__name__}: {first})") from None


def _resume(state, cfg, parts, student, early, run_dir, logger):
    """Load last.pt into the run's objects; return ``(best_auc, best_epoch, epochs done, stopped, finished)``."""
    epochs = cfg["training"]["epochs"]
    try:
        student.load_state_dict(state["student"])
        parts.teacher.load_state_dict(state["teacher"])
        parts.optimizer.load_state_dict(state["optimizer"])
        restore_scaler(parts.precision, state)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{run_dir / 'last.pt'} does not fit model.backbone {cfg['model']['backbone']} "
                        f"({type(exc).__name__}: {first})") from None
    scheduler = parts.scheduler
    scheduler.load_state_dict(state["scheduler"])
    early.load_state_dict(state["early_stopping"])
    done_epochs, stopped = int(state["epoch"]), bool(state["stopped"])
    set_rng_state(state["rng_state"])
    finished = stopped or done_epochs >= epochs
    if finished:
        logger.info(finished_line(run_dir / "last.pt", done_epochs, stopped, f"training.epochs {epochs}"))
    else:
        if scheduler.T_max != parts.total_steps:
            logger.info(f"training.epochs is now {epochs} (was {state['config']['training']['epochs']}): the cosine "
                        f"schedule is stretched to {parts.total_steps} steps from step {scheduler.last_epoch}")
            _set_cosine_total(scheduler, parts.total_steps, scheduler.last_epoch)
        logger.info(f"resumed from {run_dir / 'last.pt'} at epoch {done_epochs + 1}")
    return state["best_auc"], int(state["best_epoch"]), done_epochs, stopped, finished


def _validate(parts, student, epoch, device, info):
    """Val metrics of the EMA teacher and the student's val AUC (main process; shared with all)."""
    val, student_auc = None, float("nan")  # student AUC: how far the EMA teacher lags behind the student
    loader, teacher = parts.loaders["val"], parts.teacher
    if loader is not None and info.is_main:
        val = _metrics(*evaluate(teacher.model, loader, device, desc=f"epoch {epoch} val",
                                 precision=parts.precision, memory_format=parts.fmt))
        if teacher.enabled:
            student_auc = _metrics(*evaluate(student, loader, device, desc=f"epoch {epoch} val (student)",
                                             precision=parts.precision, memory_format=parts.fmt))["auc"]
    return broadcast_object((val, student_auc), info)


def _train(cfg, state, device, data, prior, sampler, student, run_dir, logger, writer_factory, info=DistInfo()):
    training, model_cfg, data_cfg = cfg["training"], cfg["model"], cfg["data"]
    epochs, seed = training["epochs"], training["seed"]
    counts = data_counts(data, prior)
    logger.info(f"data {data_cfg['data_dir']}: {counts['n_train_positive']} positive + "
                f"{counts['n_train_unlabeled']} unlabelled training patches of {counts['patch_size']} px; "
                f"val {counts['n_val']} ({counts['n_val_positive']} positive), "
                f"test {counts['n_test']} ({counts['n_test_positive']} positive)"
                + _heldout_note(data))
    meta = data.metadata if isinstance(data.metadata, dict) else {}
    how = "" if cfg["loss"]["prior"] != "auto" else (" (from the data's metadata)" if meta.get("prior") is not None
                                                      else " (the documented default: the data hold no prior)")
    logger.info(f"prior {prior:g}" + how
                + f" | {len(sampler)} batches of {sampler.batch_size}"
                + (f" per process ({info.world_size} processes)" if info.enabled else "") + " per epoch, ratio "
                f"{data_cfg['batch_ratio'][0]}:{data_cfg['batch_ratio'][1]}"
                f" | {'selective' if cfg['loss']['selective'] else 'standard'} FixMatch")
    parts = _build(cfg, device, data, prior, sampler, student, logger, info)
    teacher, save = parts.teacher, main_only(save_checkpoint, info)
    early = EarlyStopping(training["early_stopping_patience"])
    best_auc, best_epoch, start_epoch, stopped = None, 0, 0, False  # epochs are counted from 1; 0 = none yet
    if state is not None:
        best_auc, best_epoch, start_epoch, stopped, finished = _resume(state, cfg, parts, student, early, run_dir,
                                                                       logger)
        results = _read_results(run_dir) if finished else None
        if results is not None:
            return results

    factory = writer_factory if info.is_main else (lambda step: NullSummaryWriter())
    writer = _LazyWriter(factory, purge_step=start_epoch + 1)
    warned_nan_auc = False
    try:
        for epoch_index in range(start_epoch, epochs if not stopped else start_epoch):
            epoch = epoch_index + 1
            sampler.set_epoch(epoch_index)
            stats = train_one_epoch(parts.train_model, teacher, parts.loaders["train"], parts.optimizer,
                                    parts.scheduler, parts.params, epoch_index, device, desc=f"epoch {epoch} train",
                                    generator=_aug_generator(device, seed + 7919 * info.rank, epoch_index),
                                    precision=parts.precision, memory_format=parts.fmt)
            # every process trained on its own batches: log the mean (counts and throughput: the sum)
            stats = mean_over_processes(stats, info, device, sum_keys=("steps", "patches", "patches_per_s"))
            # the main process's validation decides best model and early stopping for all processes
            val, student_auc = _validate(parts, student, epoch, device, info)
            auc = val["auc"] if val is not None else float("nan")
            improved = not math.isnan(auc) and (best_auc is None or auc > best_auc)
            fallback = math.isnan(auc) and best_auc is None  # val cannot rank: keep the latest epoch
            if improved or fallback:
                best_auc, best_epoch = (auc if improved else None), epoch
                save({"model": teacher.model.state_dict(), "student": student.state_dict(), "config": cfg,
                      "epoch": epoch, "val_metrics": val, "backbone": model_cfg["backbone"],
                      "patch_size": int(data.patch_size), "prior": prior, "context": unwrap_model(student).context,
                      # how the patches were made (downsampling, normalisation, particle radius):
                      # pick_particles.py prepares micrographs the same way
                      "data_metadata": to_json_safe(data.metadata)}, run_dir / "best_model.pt")
                if fallback and not warned_nan_auc:
                    logger.info("val AUC is undefined (val is empty or holds one class only): best_model.pt holds "
                                "the latest epoch and early stopping is off")
                    warned_nan_auc = True
            if not math.isnan(auc):
                stopped = early.step(improved)
            _log_epoch(writer, logger, stats, val, student_auc, teacher.enabled, epoch, epochs, improved)
            save({"epoch": epoch, "student": student.state_dict(), "teacher": teacher.state_dict(),
                  "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                  "scaler": parts.precision.scaler.state_dict(), "best_auc": best_auc, "best_epoch": best_epoch,
                  "early_stopping": early.state_dict(), "stopped": stopped, "split": data.split,
                  "rng_state": rng_state(), "config": cfg, "backbone": model_cfg["backbone"],
                  "patch_size": int(data.patch_size)}, run_dir / "last.pt")
            start_epoch = epoch
            if stopped:
                logger.info(f"early stopping: val AUC has not improved for {training['early_stopping_patience']} "
                            f"epochs (best {_fmt(best_auc)} at epoch {best_epoch})")
                break
    finally:
        writer.close()
    if info.enabled:  # DDP's invariant; a failure here is a bug, not a user error
        if not replicas_in_sync(student, info):
            raise RuntimeError("the processes' student parameters differ after training (DDP out of sync)")
        logger.info(f"student parameters identical on the {info.world_size} processes")
    barrier(info)  # best_model.pt and last.pt are on disk
    if info.is_main:
        _finish(cfg, data, counts, teacher, parts.loaders["test"], device, run_dir, logger, start_epoch)
    barrier(info)
    return _read_results(run_dir)


def _read_results(run_dir):
    """results.json's dict plus ``run_dir``; None when the file is missing or unreadable (then rewritten)."""
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return {**results, "run_dir": str(run_dir)} if isinstance(results, dict) else None


def _log_epoch(writer, logger, stats, val, student_auc, ema, epoch, epochs, improved):
    """TensorBoard scalars of the epoch and its train.log line."""
    for key in TRAIN_SCALARS:
        if not math.isnan(stats[key]):
            writer.add_scalar(f"train/{key}", stats[key], epoch)
    for key in VAL_SCALARS if val is not None else ():
        if not math.isnan(val[key]):
            writer.add_scalar(f"val/{key}", val[key], epoch)
    if not math.isnan(student_auc):
        writer.add_scalar("val/student_auc", student_auc, epoch)
    writer.flush()
    logger.info(
        f"epoch {epoch}/{epochs} | loss {stats['loss']:.4f} (pos {stats['loss_pos']:.4f} neg "
        f"{stats['loss_neg']:.4f} nn {stats['nn_correction_rate']:.2f}) | cons {stats['consistency_loss']:.4f} "
        f"x{stats['consistency_weight']:.2f} | ent {stats['entropy_loss']:.4f} x{stats['entropy_weight']:.3g} | "
        f"mask {_fmt(stats['mask_rate'], '.3f')} pseudo+ {_fmt(stats['pseudo_positive_rate'], '.3f')} | "
        f"lr {stats['lr']:.2e} | {stats['patches_per_s']:.0f} patches/s {stats['seconds']:.1f}s | "
        + (f"val auc {_fmt(val['auc'])} ap {_fmt(val['ap'])} precision {_fmt(val['precision'])} "
           f"recall {_fmt(val['recall'])} f1 {_fmt(val['f1'])} best_f1 {_fmt(val['best_f1'])}"
           + (f" (student auc {_fmt(student_auc)})" if ema else "")
           if val is not None else "no val set")
        + (" | new best" if improved else ""))


def _finish(cfg, data, counts, teacher, test_loader, device, run_dir, logger, epochs_run):
    """Test the best teacher at threshold 0.5 and at val's best-F1 threshold; choose the picking
    threshold and store it in best_model.pt; write results.json."""
    best = load_checkpoint(run_dir / "best_model.pt", map_location="cpu")
    teacher.model.load_state_dict(best["model"])
    val = best["val_metrics"]
    test = test_at_best = None
    if test_loader is not None:
        labels, probs = evaluate(teacher.model, test_loader, device, desc="test")
        test = _metrics(labels, probs)
        threshold = val.get("best_f1_threshold") if val is not None else None
        if threshold is not None and not math.isnan(threshold):
            test_at_best = _metrics(labels, probs, threshold=threshold)
    else:
        logger.info("no test set: results.json has no test metrics")
    picking = _picking_threshold(teacher.model, data, best.get("prior"), val, device, cfg)
    best["picking_threshold"] = picking
    save_checkpoint(best, run_dir / "best_model.pt")
    logger.info(f"picking threshold: {picking['rule']} rule"
                + (f" {picking['value']:.4f}" if "value" in picking else "") + f" ({picking['why']}), stored in "
                f"{run_dir / 'best_model.pt'} for pick_particles.py --threshold auto")
    results = {"best_epoch": int(best["epoch"]), "epochs_run": int(epochs_run), "heldout": bool(data.heldout),
               "val": val, "test": test, "test_at_val_best_f1_threshold": test_at_best,
               "picking_threshold": picking, "data": counts}
    write_json(run_dir / "results.json", results)
    if test is not None:
        logger.info(f"test (best epoch {results['best_epoch']}, teacher) | auc {_fmt(test['auc'])} ap {_fmt(test['ap'])} "
                    f"precision {_fmt(test['precision'])} recall {_fmt(test['recall'])} f1 {_fmt(test['f1'])}"
                    + (f" | at val's best-F1 threshold {test_at_best['threshold']:.3f}: f1 {_fmt(test_at_best['f1'])}"
                       if test_at_best is not None else ""))
    logger.info(f"results in {run_dir / 'results.json'}")


# at most this many unlabelled training patches are scored for the prior rule (a seeded subset)
MAX_THRESHOLD_PATCHES = 20000


def _picking_threshold(model, data, prior, val, device, cfg):
    """How ``pick_particles.py --threshold auto`` picks, as a dict (``rule``, ``why``, and the rule's numbers).

    * ``val_best_f1``: ``value`` = the best-F1 threshold on a LABELLED val set (``val.pt``: held-out
      micrographs whose every particle is annotated), when there is one with both classes;
    * ``prior`` (data made from micrographs by preprocess_cryoem.py): otherwise (val is a
      positive-vs-unlabelled hold-out, whose F1 is biased by the particles hidden among the
      unlabelled) the prior says how many particles a micrograph holds: the fraction ``prior`` of
      windows lies within ``positive_radius`` of a particle, i.e. ``particles_per_px = prior /
      (pi * positive_radius^2)`` per original px^2 (Topaz's estimate, inverted); picking then keeps
      that many picks per micrograph area, i.e. the threshold is the score of the last of them
      (utils/picking/picker.py). It is fixed on the dense map's own peaks, because a window's
      score and a peak's differ (a peak is the best of its neighbourhood, and for a small window
      the dense map is not the crop classifier, models/dense.py);
    * ``prior_windows`` (patch data without micrograph geometry): ``value`` = the score above which
      the fraction ``prior`` of the unlabelled training windows lies
      (:func:`utils.picking.peaks.prior_threshold`).
    """
    if val is not None and not data.val.heldout and math.isfinite(val.get("best_f1_threshold", math.nan)):
        return {"value": float(val["best_f1_threshold"]), "rule": "val_best_f1", "val_best_f1": val["best_f1"],
                "why": f"best F1 {val['best_f1']:.3f} on the labelled val set"}
    meta = data.metadata if isinstance(data.metadata, dict) else {}
    radius = meta.get("positive_radius")
    if isinstance(radius, (int, float)) and not isinstance(radius, bool) and radius > 0:
        density = float(prior) / (math.pi * float(radius) ** 2)
        return {"rule": "prior", "prior": float(prior), "positive_radius": float(radius), "particles_per_px": density,
                "why": f"prior {prior:.3g} of windows within {radius:g} px of a particle: {density * 1e6:.3g} "
                       f"particles per million px, as many picks per micrograph"}
    n_unl, n_pos = data.train.n_unl, data.train.n_pos
    index = torch.arange(n_pos, n_pos + n_unl)
    if n_unl > MAX_THRESHOLD_PATCHES:
        generator = torch.Generator().manual_seed(int(cfg["training"]["seed"]))
        index = index[torch.randperm(n_unl, generator=generator)[:MAX_THRESHOLD_PATCHES]]
    subset = torch.utils.data.Subset(data.train, index.tolist())
    loader = seeded_loader(subset, device, cfg["data"]["num_workers"], cfg["training"]["seed"],
                           batch_size=2 * cfg["training"]["batch_size"])
    _, scores = evaluate(model, loader, device, desc="threshold")
    value = prior_threshold(scores.numpy(), prior)
    return {"value": value, "rule": "prior_windows", "prior": float(prior), "n_windows": len(index),
            "why": f"the top {prior:.3g} (the prior) of {len(index)} unlabelled training windows score above it"}
