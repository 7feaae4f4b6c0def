"""Resuming a CryoEM run from its ``last.pt`` (``train_pu_selective_fixmatch.py --resume``).

:func:`load_run_state` reads and checks ``last.pt`` before anything is written; :func:`load_student`
refuses a checkpoint that does not fit the model (also before the run directory changes);
:func:`restore` loads the rest into the run's objects once the run is open.
"""
import math

from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.run import finished_line, restore_scaler
from utils.seed import set_rng_state

# Config keys a resumed run may change; any other difference from last.pt's config is refused
# (it would silently mix two experiments in one run directory).
RESUMABLE_CHANGES = ("data.data_dir", "data.num_workers", "data.max_open_chunks", "training.epochs",
                     "training.early_stopping_patience", "training.device", "training.amp",
                     "training.channels_last", "training.compile", "training.deterministic")
LAST_KEYS = ("epoch", "student", "teacher", "optimizer", "scheduler", "best_auc", "best_epoch",
             "early_stopping", "split", "rng_state", "config", "stopped")


def _flatten(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def load_run_state(last_path, cfg):
    """``last.pt`` of a CryoEM run, checked: every key a resume needs, and a config that differs
    from ``cfg`` in nothing but :data:`RESUMABLE_CHANGES`."""
    state = load_checkpoint(last_path, expected=("cryoem-run",), flag="--resume:")
    missing = [k for k in LAST_KEYS if k not in state]
    if missing:
        raise UserError(f"{last_path} is not a checkpoint of this trainer (missing {', '.join(missing)})")
    old, new = _flatten(state["config"]), _flatten(cfg)
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES:
            continue
        if old.get(key) != new.get(key):
            raise UserError(f"--resume: {key} is {new.get(key)!r} but the run in {last_path.parent} was trained with "
                            f"{old.get(key)!r}; a resumed run keeps its configuration (only "
                            f"{', '.join(RESUMABLE_CHANGES)} may change); use another --exp-name for a new run")
    return state


def _does_not_fit(exc, cfg, run_dir):
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return UserError(f"{run_dir / 'last.pt'} does not fit model.backbone {cfg['model']['backbone']} "
                     f"({type(exc).__name__}: {first})")


def load_student(student, state, cfg, run_dir):
    """Load last.pt's student weights; one line naming the backbone when they do not fit."""
    try:
        student.load_state_dict(state["student"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise _does_not_fit(exc, cfg, run_dir) from None


def stretch_cosine(scheduler, total_steps, step):
    """Stretch the per-iteration cosine schedule to ``total_steps`` (a resume with a new --epochs),
    continuing at ``step``: ``lr = eta_min + (lr0 - eta_min) (1 + cos(pi step / T)) / 2``."""
    scheduler.T_max = total_steps
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        lr = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / total_steps)) / 2
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def restore(state, cfg, setup, student, early, run_dir, log, total_steps):
    """Load last.pt into the run's objects (``setup``: the :class:`~utils.cryoem.epoch.EpochSetup`);
    return ``(best_auc, best_epoch, epochs done, stopped, finished)``."""
    epochs = cfg["training"]["epochs"]
    try:
        student.load_state_dict(state["student"])
        setup.teacher.load_state_dict(state["teacher"])
        setup.optimizer.load_state_dict(state["optimizer"])
        restore_scaler(setup.precision, state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise _does_not_fit(exc, cfg, run_dir) from None
    scheduler = setup.scheduler
    scheduler.load_state_dict(state["scheduler"])
    early.load_state_dict(state["early_stopping"])
    done_epochs, stopped = int(state["epoch"]), bool(state["stopped"])
    set_rng_state(state["rng_state"])
    finished = stopped or done_epochs >= epochs
    if finished:
        log.info(finished_line(run_dir / "last.pt", done_epochs, stopped, f"training.epochs {epochs}"))
    else:
        if scheduler.T_max != total_steps:
            log.info(f"training.epochs is now {epochs} (was {state['config']['training']['epochs']}): the cosine "
                     f"schedule is stretched to {total_steps} steps from step {scheduler.last_epoch}")
            stretch_cosine(scheduler, total_steps, scheduler.last_epoch)
        log.info(f"resumed from {run_dir / 'last.pt'} at epoch {done_epochs + 1}")
    return state["best_auc"], int(state["best_epoch"]), done_epochs, stopped, finished
