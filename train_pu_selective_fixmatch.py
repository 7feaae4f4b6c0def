"""PU learning + Selective FixMatch training of a cryo-EM particle classifier.

    python train_pu_selective_fixmatch.py --config configs/pu_selective_fixmatch.yaml \
        --exp-name my_experiment --data-dir /path/to/data --batch-size 32 --epochs 100

Settings come from the YAML config (utils/cryoem/config.py holds the defaults and checks): its
values are the defaults of the flags below (:data:`CONFIG_FLAGS`), and a flag given wins.

  check inputs (config, run directory, last.pt, data, sampler, model) -> write the run directory
  -> epochs of train (utils/cryoem/epoch.py) / validate the EMA teacher -> best_model.pt (best
  val AUC), last.pt (everything --resume needs) -> test the best teacher -> results.json.

Everything that can be wrong with the user's input is checked before the run directory is
created or touched, so a bad command never damages an existing run. Outputs go to
<output-dir>/<exp-name>/: config.yaml (resolved config), train.log (appended: git revision, device,
torch version, config, one line per epoch), TensorBoard events (utils/cryoem/report.py),
best_model.pt, last.pt and results.json (test metrics of the best model). See the README,
"CryoEM PU + Selective FixMatch".
"""
import argparse
import dataclasses
import functools
import json
import math
from pathlib import Path

import torch

from datasets.cryoem_dataset_pu import PUBatchSampler, load_pu_data
from models.fixmatch_pu import EMATeacher, FixMatchPUModel, unwrap_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.cryoem.config import arg_type, dump_config, load_config, value_at, with_values
from utils.cryoem.epoch import (EpochSetup, StepParams, augmentation_generator, evaluate, evaluation_metrics,
                                train_one_epoch)
from utils.cryoem.prior import picking_threshold, prior_origin, resolve_prior
from utils.cryoem.report import (data_context, data_counts, data_line, epoch_line, fmt, picking_line, read_results,
                                 test_line, write_scalars)
from utils.cryoem.resume import load_run_state, load_student, restore
from utils.device import resolve_device
from utils.distributed import (DistInfo, barrier, broadcast_object, cleanup_distributed, init_distributed,
                               mean_over_processes, replicas_in_sync, wrap_ddp)
from utils.early_stopping import EarlyStopping
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.interrupt import rerun_command
from utils.io import to_json_safe, write_json
from utils.logger import LazySummaryWriter, buffered_logger
from utils.precision import configure_backends, make_precision, maybe_compile, memory_format
from utils.run import check_global_batch, claim_run_dir, fast_path_line, main_only, open_run, resume_point
from utils.seed import rng_state, seed_everything, seeded_loader

DEFAULT_CONFIG = "configs/pu_selective_fixmatch.yaml"

# The flags that set a config value: flag -> YAML key. The parser's default of each is the
# config's value, so a flag given on the command line wins over the YAML file.
CONFIG_FLAGS = {
    "--data-dir": "data.data_dir",
    "--batch-size": "training.batch_size",
    "--epochs": "training.epochs",
    "--prior": "loss.prior",
    "--seed": "training.seed",
    "--device": "training.device",
    "--num-workers": "data.num_workers",
    "--amp": "training.amp",
    "--compile": "training.compile",
}
_HELP = {
    "--data-dir": "folder with preprocessed_data.pt or chunk_*.pt",
    "--batch-size": "patches per batch, mixed by data.batch_ratio",
    "--epochs": "maximum number of epochs",
    "--prior": "class prior pi of the nnPU risk, a number in (0, 1) or auto = the data's metadata.prior "
               "(0.3, the documented default, with a warning when the data hold none)",
    "--seed": "random seed of split, sampler, augmentation and initialisation",
    "--device": "auto, cpu, cuda or cuda:N (auto = CUDA if available)",
    "--num-workers": "DataLoader worker processes, 0 = main process",
    "--amp": "mixed precision on a GPU: bfloat16 where supported, else float16 with loss scaling "
             "(no effect on the CPU)",
    "--compile": "torch.compile the student for training",
}


def resolve_config_path(path):
    """``path`` as given, or the repository's copy when the default is used from another directory."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute():
        beside = Path(__file__).resolve().parent / path
        if beside.is_file():
            return beside
    return path


def build_parser(config_path, cfg=None):
    """The command line; the defaults of :data:`CONFIG_FLAGS` are the values of ``cfg`` (default:
    the config read from ``config_path``)."""
    cfg = load_config(config_path) if cfg is None else cfg
    parser = ArgumentParser(
        description="Train a cryo-EM particle classifier from positive and unlabelled patches "
                    "(nnPU + Selective FixMatch with an EMA teacher). Values not given here come from --config.")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML config; its keys override the built-in defaults (default: %(default)s)")
    parser.add_argument("--exp-name", default=None,
                        help="run name: outputs go to <output-dir>/<exp-name>/ (default: the config file's stem)")
    parser.add_argument("--output-dir", default="experiments",
                        help="parent folder of the run directories (default: %(default)s/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in <output-dir>/<exp-name>/ from its last.pt (default: off, "
                             "start a new run; an existing run directory is then an error)")
    for flag, key in CONFIG_FLAGS.items():
        value = value_at(cfg, key)
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(value, bool) else {"type": arg_type(key)}
        parser.add_argument(flag, default=value, **kind,
                            help=f"{_HELP[flag]} (default: %(default)s, {key} of --config)")
    return parser


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Where a run lives and how it started: ``run_dir`` (<output-dir>/<exp-name>), ``resume``
    (--resume) and ``command`` (the shell command that resumes it, for the Ctrl-C message)."""
    run_dir: Path
    resume: bool
    command: str | None = None


def resolve_settings(argv=None):
    """``(cfg, spec)``: the resolved config (defaults < YAML < flags) and the :class:`RunSpec` of ``argv``."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_CONFIG)
    config_path = resolve_config_path(pre.parse_known_args(argv)[0].config)
    cfg = load_config(config_path)
    args = build_parser(config_path, cfg).parse_args(argv)
    given = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key in CONFIG_FLAGS.items()}
    cfg = with_values(cfg, given, flags={key: flag for flag, key in CONFIG_FLAGS.items()})
    exp_name = args.exp_name if args.exp_name is not None else config_path.stem
    if not exp_name or exp_name in (".", "..") or "/" in exp_name or "\\" in exp_name:
        raise UserError(f"--exp-name {exp_name!r} must be a plain folder name (no path separators)")
    return cfg, RunSpec(run_dir=Path(args.output_dir) / exp_name, resume=args.resume,
                        command=rerun_command(__file__, argv, add=("--resume",)))


# ----------------------------------------------------------------------------- the run

def run(cfg, spec):
    """Train (or resume, or finish) the run in ``spec.run_dir``; return results.json's dict plus ``run_dir``."""
    run_dir, training, data_cfg = spec.run_dir, cfg["training"], cfg["data"]
    lock = claim_run_dir(run_dir, "run directory (--output-dir/--exp-name)", hint="or choose another --exp-name")
    # a run killed in its first epoch left its config and log but no last.pt: --resume starts it afresh
    last_path = resume_point(run_dir, spec.resume, "--resume", started=("last.pt",),
                             attempted=("config.yaml", "train.log"), other_flag="--exp-name")
    state = load_run_state(last_path, cfg) if last_path is not None else None
    device = resolve_device(training["device"])
    info, device = init_distributed(device)  # torchrun: one process per GPU (or gloo on the CPU)
    try:
        seed_everything(training["seed"])
        setup_log, buffer = buffered_logger("cryoem.setup")
        data = load_pu_data(data_cfg["data_dir"], val_fraction=data_cfg["val_fraction"],
                            test_fraction=data_cfg["test_fraction"], seed=training["seed"],
                            max_open_chunks=data_cfg["max_open_chunks"],
                            split=state["split"] if state is not None else None, logger=setup_log)
        prior = resolve_prior(cfg, data, setup_log)
        sampler = pu_sampler(cfg, data, info)
        model_cfg = cfg["model"]
        student = FixMatchPUModel(model_cfg["backbone"], dropout=model_cfg["dropout"],
                                  pretrained=model_cfg["pretrained"], context=data_context(data)).to(device)
        if state is not None:  # a last.pt that does not fit is refused before the run directory changes
            load_student(student, state, cfg, run_dir)

        # every input is checked: from here on the main process writes the run directory
        with open_run(run_dir, lock, info, "train.log", device, "--resume", training["epochs"],
                      spec.command) as log:
            if spec.resume and state is None:
                log.info(f"--resume: no last.pt in {run_dir}: the previous attempt stopped before its first epoch "
                         f"ended; starting afresh at epoch 1")
            log.info("config " + json.dumps(cfg, sort_keys=False))
            buffer.replay(log)
            if info.is_main:
                dump_config(cfg, run_dir / "config.yaml")
            log.info(data_line(data_cfg["data_dir"], data_counts(data, prior), data))
            log.info(f"prior {prior:g}" + prior_origin(cfg, data)
                     + f" | {len(sampler)} batches of {sampler.batch_size}"
                     + (f" per process ({info.world_size} processes)" if info.enabled else "") + " per epoch, ratio "
                     f"{data_cfg['batch_ratio'][0]}:{data_cfg['batch_ratio'][1]}"
                     f" | {'selective' if cfg['loss']['selective'] else 'standard'} FixMatch")
            setup, loaders = epoch_setup(cfg, data, prior, sampler, student, log, device=device, info=info)
            return train(cfg, setup, data, student, loaders, run_dir, log, info=info, state=state)
    finally:
        cleanup_distributed(info)


def pu_sampler(cfg, data, info=DistInfo()):
    """The batch sampler: every batch mixes positives and unlabelled by data.batch_ratio.

    training.batch_size is the global batch: each of the W processes takes batch_size / W
    patches per step, so W processes take the same steps as one (up to per-process BatchNorm).
    """
    batch_size = cfg["training"]["batch_size"]
    check_global_batch(batch_size, info, "training.batch_size")
    try:
        return PUBatchSampler(data.n_pos, data.n_unl, batch_size // info.world_size,
                              ratio=tuple(cfg["data"]["batch_ratio"]), seed=cfg["training"]["seed"],
                              num_replicas=info.world_size, rank=info.rank)
    except UserError as exc:
        if not info.enabled:
            raise
        raise UserError(f"{exc} (per process: training.batch_size / {info.world_size} processes)") from None


def step_params(cfg, prior, data, student, log):
    """The :class:`StepParams` of the run: the config's loss weights and ramps, and the resolved prior."""
    params = StepParams.from_config(cfg, prior)
    context = unwrap_model(student).context
    window = data.patch_size - 2 * context
    if window != data.patch_size:  # shift the particle by up to window/8, not (window + context)/8
        params = dataclasses.replace(params, shift_fraction=params.shift_fraction * window / data.patch_size)
        log.info(f"context {context} px around a {window} px window: augmentation shifts "
                 f"up to {params.shift_fraction * data.patch_size:g} px per axis (the window's 1/8)")
    return params


def epoch_setup(cfg, data, prior, sampler, student, log, *, device, info):
    """``(setup, loaders)``: the :class:`EpochSetup` (fast path, EMA teacher, Adam, the per-iteration
    cosine schedule, step parameters, the training loader) and the val/test loaders (None when empty)."""
    training, model_cfg = cfg["training"], cfg["model"]
    # GPU fast path (utils/precision.py; all no-ops on the CPU): channels-last weights before the
    # teacher copies them, autocast + GradScaler, cuDNN autotuning, optional torch.compile
    layout = memory_format(device, training["channels_last"])
    student.to(memory_format=layout)
    precision = make_precision(device, training["amp"])
    backends = configure_backends(device, training["deterministic"])
    train_model = maybe_compile(wrap_ddp(student, info, device), training["compile"])
    log.info(fast_path_line(precision, layout, training["compile"], backends))
    teacher = EMATeacher(student, decay=model_cfg["ema_decay"], enabled=model_cfg["use_ema"])
    # the fused kernel: one pass over all parameters (on the CPU ~50x faster than the per-tensor loop)
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.Adam(student.parameters(), lr=training["learning_rate"],
                                 weight_decay=training["weight_decay"], **fused)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=training["epochs"] * len(sampler),
                                                           eta_min=training["min_lr"])
    params = step_params(cfg, prior, data, student, log)
    loader = functools.partial(seeded_loader, device=device, num_workers=cfg["data"]["num_workers"],
                               seed=training["seed"])
    setup = EpochSetup(train_model, teacher, loader(data.train, batch_sampler=sampler), optimizer, scheduler,
                       params, device, precision=precision, memory_format=layout)
    loaders = {split: loader(getattr(data, split), batch_size=2 * training["batch_size"])
               if len(getattr(data, split)) else None for split in ("val", "test")}
    return setup, loaders


def train(cfg, setup, data, student, loaders, run_dir, log, *, info=DistInfo(), state=None):
    """The epochs: train, validate the EMA teacher, keep the best (val AUC) and last.pt; then test.

    Returns results.json's dict plus ``run_dir``. ``state``: last.pt's dict of a resumed run.
    """
    training, teacher, device = cfg["training"], setup.teacher, setup.device
    epochs, prior = training["epochs"], setup.params.prior
    sampler = setup.loader.batch_sampler
    save = main_only(save_checkpoint, info)
    early = EarlyStopping(training["early_stopping_patience"])
    best_auc, best_epoch, done, stopped = None, 0, 0, False  # epochs are counted from 1; 0 = none yet
    if state is not None:
        best_auc, best_epoch, done, stopped, finished = restore(state, cfg, setup, student, early, run_dir, log,
                                                                epochs * len(sampler))
        results = read_results(run_dir) if finished else None
        if results is not None:
            return results

    writer = LazySummaryWriter(run_dir, purge_step=done + 1, enabled=info.is_main)
    warned_nan_auc = False
    try:
        for epoch in range(done + 1, (done if stopped else epochs) + 1):
            sampler.set_epoch(epoch - 1)  # the sampler and the augmentation count epochs from 0
            stats = train_one_epoch(setup, epoch, desc=f"epoch {epoch} train",
                                    generator=augmentation_generator(device, training["seed"] + 7919 * info.rank,
                                                                     epoch - 1))
            # every process trained on its own batches: log the mean (counts and throughput: the sum)
            stats = mean_over_processes(stats, info, device, sum_keys=("steps", "patches", "patches_per_s"))
            # the main process's validation decides best model and early stopping for all processes
            val, student_auc = validate(setup, student, loaders["val"], epoch, info)
            auc = val["auc"] if val is not None else float("nan")
            improved = not math.isnan(auc) and (best_auc is None or auc > best_auc)
            fallback = math.isnan(auc) and best_auc is None  # val cannot rank: keep the latest epoch
            if improved or fallback:
                best_auc, best_epoch = (auc if improved else None), epoch
                save({"model": teacher.model.state_dict(), "student": student.state_dict(), "config": cfg,
                      "epoch": epoch, "val_metrics": val, "backbone": cfg["model"]["backbone"],
                      "patch_size": int(data.patch_size), "prior": prior, "context": unwrap_model(student).context,
                      # how the patches were made (downsampling, normalisation, particle radius):
                      # pick_particles.py prepares micrographs the same way
                      "data_metadata": to_json_safe(data.metadata)}, run_dir / "best_model.pt")
                if fallback and not warned_nan_auc:
                    log.info("val AUC is undefined (val is empty or holds one class only): best_model.pt holds "
                             "the latest epoch and early stopping is off")
                    warned_nan_auc = True
            if not math.isnan(auc):
                stopped = early.step(improved)
            write_scalars(writer, stats, val, student_auc, epoch)
            log.info(epoch_line(stats, val, student_auc, teacher.enabled, epoch, epochs, improved))
            save({"epoch": epoch, "student": student.state_dict(), "teacher": teacher.state_dict(),
                  "optimizer": setup.optimizer.state_dict(), "scheduler": setup.scheduler.state_dict(),
                  "scaler": setup.precision.scaler.state_dict(), "best_auc": best_auc, "best_epoch": best_epoch,
                  "early_stopping": early.state_dict(), "stopped": stopped, "split": data.split,
                  "rng_state": rng_state(), "config": cfg, "backbone": cfg["model"]["backbone"],
                  "patch_size": int(data.patch_size)}, run_dir / "last.pt")
            done = epoch
            if stopped:
                log.info(f"early stopping: val AUC has not improved for {training['early_stopping_patience']} "
                         f"epochs (best {fmt(best_auc)} at epoch {best_epoch})")
                break
    finally:
        writer.close()
    if info.enabled:  # DDP's invariant; a failure here is a bug, not a user error
        if not replicas_in_sync(student, info):
            raise RuntimeError("the processes' student parameters differ after training (DDP out of sync)")
        log.info(f"student parameters identical on the {info.world_size} processes")
    barrier(info)  # best_model.pt and last.pt are on disk
    if info.is_main:
        finish(cfg, data, setup, loaders["test"], run_dir, log, epochs_run=done)
    barrier(info)
    return read_results(run_dir)


def validate(setup, student, loader, epoch, info=DistInfo()):
    """``(val metrics of the EMA teacher, the student's val AUC)`` (main process; shared with all)."""
    val, student_auc = None, float("nan")  # student AUC: how far the EMA teacher lags behind the student
    teacher, device = setup.teacher, setup.device
    if loader is not None and info.is_main:
        val = evaluation_metrics(*evaluate(teacher.model, loader, device, desc=f"epoch {epoch} val",
                                           precision=setup.precision, memory_format=setup.memory_format))
        if teacher.enabled:
            student_auc = evaluation_metrics(*evaluate(student, loader, device, desc=f"epoch {epoch} val (student)",
                                                       precision=setup.precision,
                                                       memory_format=setup.memory_format))["auc"]
    return broadcast_object((val, student_auc), info)


def test_metrics(model, loader, val, device):
    """``(test, test_at_best)``: test metrics at threshold 0.5 and at val's best-F1 threshold (None
    when val has none)."""
    labels, probs = evaluate(model, loader, device, desc="test")
    threshold = val.get("best_f1_threshold") if val is not None else None
    at_best = None
    if threshold is not None and not math.isnan(threshold):
        at_best = evaluation_metrics(labels, probs, threshold=threshold)
    return evaluation_metrics(labels, probs), at_best


def finish(cfg, data, setup, test_loader, run_dir, log, *, epochs_run):
    """Test the best teacher; choose the picking threshold and store it in best_model.pt; write results.json."""
    teacher, device = setup.teacher, setup.device
    best = load_checkpoint(run_dir / "best_model.pt", map_location="cpu")
    teacher.model.load_state_dict(best["model"])
    val = best["val_metrics"]
    test = test_at_best = None
    if test_loader is not None:
        test, test_at_best = test_metrics(teacher.model, test_loader, val, device)
    else:
        log.info("no test set: results.json has no test metrics")
    picking = picking_threshold(teacher.model, data, best.get("prior"), val, device, cfg)
    best["picking_threshold"] = picking
    save_checkpoint(best, run_dir / "best_model.pt")
    log.info(picking_line(picking, run_dir / "best_model.pt"))
    results = {"best_epoch": int(best["epoch"]), "epochs_run": int(epochs_run), "heldout": bool(data.heldout),
               "val": val, "test": test, "test_at_val_best_f1_threshold": test_at_best,
               "picking_threshold": picking, "data": data_counts(data, setup.params.prior)}
    write_json(run_dir / "results.json", results)
    if test is not None:
        log.info(test_line(results))
    log.info(f"results in {run_dir / 'results.json'}")


@exit_on_user_error
def main(argv=None):
    """Parse ``argv`` (default: sys.argv), train, and return the results dict (results.json plus ``run_dir``)."""
    cfg, spec = resolve_settings(argv)
    return run(cfg, spec)


if __name__ == "__main__":
    main()
