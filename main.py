"""Self-paced multi-instance multi-label training on ANA immunofluorescence images.

    python main.py --saveModel --lr 1e-3 --weight_lr 1e-3 --initWeight iw-sample \
        --updateLR ulr-adaptive --granularity label --sampling --trainingLabel pseudo

Defaults come from config.py; every flag overrides them. See README.md. Read top to bottom:
``build_parser`` (the flags), ``resolve_settings`` (flags + config -> the run's settings, the
last place the config module is read), ``load_data``, ``build``, ``resume``, ``validate``,
``evaluate_test`` and ``run``, whose epoch loop trains, validates on each epoch, tests each new
best model and saves ``last.pt``. main_single.py runs the same functions with config_single.py.
"""
import argparse
import json
from contextlib import ExitStack
from pathlib import Path

import torch

import config
from datasets.ana import CachedTileDataset, build_tile_caches, describe, load_splits, missing_tile_caches
from datasets.samplers import InstanceSampler
from models.backbones import RESNETS, build_resnet_classifier
from models.pseudo_labels import TRAINING_LABELS
from models.sample_weights import (GRANULARITIES, GROUPINGS, INIT_METHODS, LR_METHODS, WEIGHT_OPTIMIZERS,
                                  InstanceWeights, init_weights)
from utils.ana.epoch import BatchPreprocessor, EpochSetup, bag_max, predict, train_epoch
from utils.ana.outputs import (BEST_METRICS, NullResults, describe_weights, keep_best_models, log_epoch,
                               log_scalars, write_confusion, write_instances, write_predictions,
                               write_tile_predictions)
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.checks import SEED_MAX, check_output_dir, float_arg, int_arg, range_problem
from utils.device import resolve_device
from utils.distributed import (broadcast_object, cleanup_distributed, init_distributed, mean_over_processes,
                               replicas_in_sync, wrap_ddp)
from utils.early_stopping import EarlyStopping
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.figures import confusion_matrix_image
from utils.interrupt import rerun_command
from utils.io import ResultsFile, write_json
from utils.logger import LazySummaryWriter, buffered_logger
from utils.metrics import best_improved, format_metrics, multilabel_metrics, singlelabel_metrics
from utils.precision import make_precision, maybe_compile, memory_format
from utils.run import (check_global_batch, claim_run_dir, fast_path_line, finished_line, main_only, open_run,
                       restore_scaler, resume_point)
from utils.seed import rng_state, seed_everything, seeded_loader, set_rng_state

DESCRIPTION = "Self-paced MIML training for ANA images (multi-label). Defaults from config.py."
# The range of every numeric flag: the argparse type (checked at parse time) and, for the
# defaults that come from the config module, check_args.
ARG_TYPES = {
    "lr": float_arg(0, low_open=True), "weight_lr": float_arg(0), "weightDecay": float_arg(0),
    "epoch": int_arg(1), "trainBatchSize": int_arg(1), "testBatchSize": int_arg(1), "patience": int_arg(0),
    "resampleEvery": int_arg(1), "numClasses": int_arg(0),
    "imageSize": int_arg(32),  # the ResNet downsamples by 32
    "tileSize": int_arg(1), "numWorkers": int_arg(0), "seed": int_arg(0, SEED_MAX),
}


def build_parser(cfg=config, description=DESCRIPTION):
    """Every flag of the reference code's README plus ours; defaults come from the config module ``cfg``."""
    parser = ArgumentParser(description=description)
    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr", type=ARG_TYPES["lr"], default=cfg.LR,
                   help="network learning rate (default: %(default)s)")
    g.add_argument("--weight_lr", type=ARG_TYPES["weight_lr"], default=cfg.WEIGHT_LR, action=_StoreWeightLR,
                   help="learning rate of the instance weights (default: %(default)s with --weightOptimizer adam, "
                        f"where None means the network's --lr; {cfg.SGD_WEIGHT_LR:g} with --weightOptimizer sgd)")
    g.add_argument("--epoch", type=ARG_TYPES["epoch"], default=cfg.EPOCHS,
                   help="maximum number of epochs (default: %(default)s)")
    g.add_argument("--trainBatchSize", type=ARG_TYPES["trainBatchSize"], default=cfg.TRAIN_BATCH_SIZE,
                   help="training batch size (default: %(default)s)")
    g.add_argument("--testBatchSize", type=ARG_TYPES["testBatchSize"], default=cfg.TEST_BATCH_SIZE,
                   help="evaluation batch size (default: %(default)s)")
    g.add_argument("--weightDecay", type=ARG_TYPES["weightDecay"], default=cfg.WEIGHT_DECAY,
                   help="Adam L2 weight decay, network and instance weights (default: %(default)s)")
    g.add_argument("--patience", type=ARG_TYPES["patience"], default=cfg.PATIENCE,
                   help="early stopping: epochs without any val metric improving (0 = off; default: %(default)s)")
    g.add_argument("--resetOptimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="reset the network's Adam state whenever the weights' optimiser restarts (after every epoch "
                        "of --updateLR ulr-adaptive), as the reference's rebuilt optimiser did (default: on; "
                        "--no-resetOptimizer keeps it)")
    g = parser.add_argument_group("self-paced method")
    g.add_argument("--weightOptimizer", choices=WEIGHT_OPTIMIZERS, default="adam",
                   help="how the instance weights move: the reference's per-group Adam (a step of about "
                        "lambda_g * weight_lr whatever the loss), or sgd, a plain gradient step on the batch's rows "
                        "(lambda_g * weight_lr * loss: a pair loses weight in proportion to its loss) "
                        "(default: %(default)s)")
    g.add_argument("--initWeight", choices=INIT_METHODS, default=cfg.INIT_WEIGHT,
                   help="weight initialisation (default: %(default)s)")
    g.add_argument("--updateLR", choices=LR_METHODS, default=cfg.UPDATE_LR,
                   help="per-label-combination weight learning rates (default: %(default)s)")
    g.add_argument("--trainingLabel", choices=TRAINING_LABELS, default=cfg.TRAINING_LABEL,
                   help="targets: bag labels, Bernoulli pseudo-labels, or soft labels (default: %(default)s)")
    g.add_argument("--granularity", choices=GRANULARITIES, default=cfg.GRANULARITY,
                   help="one weight per tile and class, or per tile (default: %(default)s)")
    g.add_argument("--weightGroups", choices=GROUPINGS, default=cfg.WEIGHT_GROUPS,
                   help="tiles whose weights share one Adam parameter group: the same number of labels (the "
                        "reference main.py), the same label set (the paper's text), or all in one (the reference "
                        "main_single.py) (default: %(default)s)")
    g.add_argument("--sampling", action=argparse.BooleanOptionalAction, default=cfg.SAMPLING,
                   help="draw tiles by their weights instead of shuffling (default: %(default)s)")
    g.add_argument("--resampleEvery", type=ARG_TYPES["resampleEvery"], default=cfg.RESAMPLE_EVERY,
                   help="epochs between recomputing the sampler's probabilities from the weights, on epochs "
                        "1, 1 + N, ... (the reference main_single.py rebuilt its sampler on odd epochs; "
                        "default: %(default)s)")
    g.add_argument("--valLevel", choices=("tile", "image"), default=cfg.VAL_LEVEL,
                   help="validation (early stopping, best models) on tiles with their image's labels, or on "
                        "images (max over tiles) (default: %(default)s)")
    g = parser.add_argument_group("data and model")
    g.add_argument("--annFile", default=None,
                   help="annotation CSV for train, val and test (default: PATH_TRAIN/TEST_ANNFILE of the config)")
    g.add_argument("--imageDir", default=None, help="image directory for all splits (default: DIR_TRAIN/TEST_IMAGES of the config)")
    g.add_argument("--bagColumn", default=cfg.BAG_COLUMN,
                   help="pre-tiled CSV: column naming each tile's bag (default: none, whole images are tiled)")
    g.add_argument("--numClasses", type=ARG_TYPES["numClasses"], default=cfg.NUM_CATEGORIES,
                   help="number of classes (default: %(default)s; 0 = infer from the CSV)")
    g.add_argument("--arch", choices=RESNETS, default=cfg.ARCH, help="backbone (default: %(default)s)")
    g.add_argument("--imageSize", type=ARG_TYPES["imageSize"], default=cfg.N,
                   help="tiles are resized to N x N, N >= 32 (default: %(default)s)")
    g.add_argument("--tileSize", type=ARG_TYPES["tileSize"], default=cfg.TILE_SIZE,
                   help="tile side in source pixels (default: %(default)s)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ImageNet weights: --pretrainedWeights, else the torch hub cache, else a download "
                        "(default: on; an offline machine needs --no-pretrained)")
    g.add_argument("--pretrainedWeights", default=None, help="local ImageNet weight file for --pretrained")
    g.add_argument("--allowSplitOverlap", action="store_true",
                   help="train even when an image is in more than one split (default: off, such a leak is an error)")
    g = parser.add_argument_group("run")
    g.add_argument("--saveModel", action="store_true", help="save the best model per metric (default: off)")
    g.add_argument("--loadModel", action="store_true", help="resume from last.pt in --pathModelParams (default: off)")
    g.add_argument("--pathModelParams", default=None,
                   help=f"run directory (default: {cfg.PATH_MODEL_ROOT}/<name built from the hyperparameters>)")
    g.add_argument("--cacheDir", default=cfg.CACHE_DIR, help="where decoded tiles are cached (default: %(default)s)")
    g.add_argument("--numWorkers", type=ARG_TYPES["numWorkers"], default=2,
                   help="DataLoader worker processes (default: %(default)s)")
    g.add_argument("--seed", type=ARG_TYPES["seed"], default=42, help="random seed (default: %(default)s)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU; default: off)")
    g = parser.add_argument_group("GPU fast path (no effect on the CPU)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision: bfloat16 where the GPU supports it, else float16 with loss scaling "
                        "(default: on)")
    g.add_argument("--channelsLast", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format for the network and batches (default: on)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the network for training (default: off)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    return parser


class _StoreWeightLR(argparse.Action):
    """``--weight_lr`` that also records that the user gave it (``weight_lr_given``), so that
    ``--weightOptimizer sgd`` can use its own default only when none was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.weight_lr_given = True


def weight_lr(args):
    """The instance weights' learning rate: ``--weight_lr``, or the network's ``--lr`` when None."""
    return args.lr if args.weight_lr is None else args.weight_lr


def check_args(args, cfg):
    """The ranges of ARG_TYPES for values that did not pass through argparse (the config's defaults),
    and flag combinations that cannot work."""
    for name, arg_type in ARG_TYPES.items():
        value = getattr(args, name)
        problem = None if value is None else range_problem(value, **arg_type.bounds)
        if problem:
            raise UserError(f"--{name} (default from {cfg.__name__}.py): {problem}")
    problem = range_problem(cfg.SGD_WEIGHT_LR, **ARG_TYPES["weight_lr"].bounds)
    if problem:
        raise UserError(f"SGD_WEIGHT_LR of {cfg.__name__}.py: {problem}")
    if args.updateLR == "ulr-adaptive" and args.weightGroups == "one":
        raise UserError("--updateLR ulr-adaptive sets a learning rate per group of tiles with the same labels; "
                        "with --weightGroups one there is one group: use --weightGroups count or combination")


def default_run_name(args, cfg):
    """Run directory built from the hyperparameters, so different settings never collide."""
    sampling = "sampling" if args.sampling else "nosampling"
    wlr = f"{weight_lr(args):g}" + ("_sgd" if args.weightOptimizer == "sgd" else "")
    name = (f"{cfg.RUN_PREFIX}_{args.arch}_N{args.imageSize}_T{args.tileSize}_lr{args.lr:g}_wlr{wlr}_"
            f"{args.initWeight}_{args.updateLR}_{args.granularity}_{args.weightGroups}_{args.trainingLabel}_"
            f"{sampling}_val{args.valLevel}_bs{args.trainBatchSize}_seed{args.seed}")
    return Path(cfg.PATH_MODEL_ROOT) / name


def resolve_settings(args, cfg):
    """The run's settings: a new namespace with the flags of ``args`` and every fallback to the
    config module ``cfg`` applied (nothing reads ``cfg`` after this). ``args`` is not changed.

    Beside the flags: ``train_annotations``/``test_annotations`` and ``train_images``/``test_images``
    (``--annFile``/``--imageDir`` or the config's paths), ``num_classes`` (None: from the CSV),
    ``run_dir``, ``mean``/``std``, ``single_label``, ``weight_lr_used`` (``--weight_lr``; the
    config's SGD_WEIGHT_LR for ``--weightOptimizer sgd`` without one; ``--lr`` when None),
    ``weight_lr_given``, ``config_module``, and ``flags`` (the flags as resolved, for args.json and
    the checkpoint's ``config``).
    """
    check_args(args, cfg)
    flags = dict(vars(args))
    if args.weightOptimizer == "sgd" and not getattr(args, "weight_lr_given", False):
        flags["weight_lr"] = cfg.SGD_WEIGHT_LR
    settings = argparse.Namespace(**flags)
    settings.flags = flags
    settings.weight_lr_given = bool(getattr(args, "weight_lr_given", False))
    settings.weight_lr_used = weight_lr(settings)
    settings.train_annotations = Path(args.annFile or cfg.PATH_TRAIN_ANNFILE)
    settings.test_annotations = Path(args.annFile or cfg.PATH_TEST_ANNFILE)
    settings.train_images = args.imageDir or cfg.DIR_TRAIN_IMAGES
    settings.test_images = args.imageDir or cfg.DIR_TEST_IMAGES
    settings.num_classes = args.numClasses or None
    settings.run_dir = Path(args.pathModelParams) if args.pathModelParams else default_run_name(settings, cfg)
    settings.mean, settings.std = tuple(cfg.MEAN), tuple(cfg.STD)
    settings.single_label = bool(cfg.SINGLE_LABEL)
    settings.config_module = cfg.__name__
    return settings


def settings_record(settings):
    """What args.json holds: the flags, the resolved weight learning rate and the config module's
    constants that are not flags."""
    return {**settings.flags, "weight_lr_used": settings.weight_lr_used, "config_module": settings.config_module,
            "MEAN": list(settings.mean), "STD": list(settings.std), "SINGLE_LABEL": settings.single_label}


def load_data(settings, logger):
    """Read the annotations and plan the tiles of each split (decodes nothing); returns
    ``(tiles, num_classes)`` and logs what was dropped or found twice."""
    sources = {"train": (settings.train_annotations, settings.train_images),
               "test": (settings.test_annotations, settings.test_images)}
    tiles, num_classes, notes = load_splits(sources, settings.tileSize, num_classes=settings.num_classes,
                                            bag_column=settings.bagColumn, single_label=settings.single_label,
                                            allow_overlap=settings.allowSplitOverlap)
    for note in notes:
        logger.info(note)
    return tiles, num_classes


def check_resumable(state, model, train, settings, last_path):
    """Refuse a resume whose last.pt does not fit the model (--arch, the classes) or the training tiles
    (the annotations or images changed, or --granularity): what would otherwise fail mid-way
    through loading it, after the run's log had grown."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError):
        raise UserError(f"{last_path} holds a different model than --arch {settings.arch} with "
                        f"{train.bag_labels.shape[1]} classes") from None
    saved, now = tuple(state["targets"].shape), tuple(train.tile_labels.shape)
    if saved != now:
        raise UserError(f"{last_path} was trained on {saved[0]} training tiles of {saved[1]} classes, the data now "
                        f"give {now[0]} of {now[1]}: a resumed run keeps its data (restore the annotations and "
                        f"images, or start a new run in another --pathModelParams)")
    alpha = init_weights(train.tile_labels, settings.initWeight, settings.granularity)
    if tuple(state["weights"]["alpha"].shape) != tuple(alpha.shape):
        raise UserError(f"{last_path} holds sample weights of shape {tuple(state['weights']['alpha'].shape)}, "
                        f"--granularity {settings.granularity} gives {tuple(alpha.shape)}: resume with the run's "
                        f"--granularity")


def build(settings, model, tiles, caches, *, device, info, logger):
    """The run's objects: optimiser, instance weights, sampler, loaders, GPU fast path; returns
    ``(setup, loaders)``, the :class:`EpochSetup` and a DataLoader per split."""
    train = tiles["train"]
    logger.info(f"model {settings.arch}, {train.bag_labels.shape[1]} classes, "
                + ("ImageNet-pretrained" if settings.pretrained else "random initialisation (--no-pretrained)"))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.999),
                                 weight_decay=settings.weightDecay)
    tile_labels = train.tile_labels.to(device)
    targets = tile_labels.clone()
    weights = InstanceWeights(init_weights(train.tile_labels, settings.initWeight, settings.granularity), targets,
                              lr=settings.weight_lr_used, update_lr=settings.updateLR, grouping=settings.weightGroups,
                              weight_decay=settings.weightDecay, optimizer=settings.weightOptimizer).to(device)
    logger.info(describe_weights(weights, settings))
    sampler = InstanceSampler(len(train), seed=settings.seed, num_replicas=info.world_size, rank=info.rank)

    def loader(split, **kwargs):
        return seeded_loader(CachedTileDataset(caches[split]), device=device, num_workers=settings.numWorkers,
                             seed=settings.seed, **kwargs)

    # --trainBatchSize is the global batch: each process takes its share
    loaders = {"train": loader("train", batch_size=settings.trainBatchSize // info.world_size, sampler=sampler)}
    for split in ("val", "test"):
        loaders[split] = loader(split, batch_size=settings.testBatchSize)
    # GPU fast path (utils/precision.py; no-ops on the CPU); cudnn.benchmark is set by seed_everything
    fmt = memory_format(device, settings.channelsLast)
    model.to(memory_format=fmt)
    precision = make_precision(device, settings.amp)
    train_model = maybe_compile(wrap_ddp(model, info, device), settings.compile)
    logger.info(fast_path_line(precision, fmt, settings.compile))
    setup = EpochSetup(model=train_model, optimizer=optimizer, weights=weights, loader=loaders["train"],
                       tile_labels=tile_labels, targets=targets,
                       preprocess=BatchPreprocessor(settings.mean, settings.std, device, memory_format=fmt),
                       sampler=sampler, precision=precision, granularity=settings.granularity,
                       training_label=settings.trainingLabel, sampling=settings.sampling,
                       resample_every=settings.resampleEvery, reset_optimizer=settings.resetOptimizer,
                       dist_info=info)
    return setup, loaders


def resume(settings, setup, model, early, results, logger):
    """Load last.pt into the run's objects; return ``(start_epoch, best, best_files, last_val, last_test)``.

    The random state is read from ``rng_state`` (or ``rng``, the key of older checkpoints)."""
    last_path = settings.run_dir / "last.pt"
    state = load_checkpoint(last_path, map_location=setup.targets.device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{last_path} holds a different model than --arch {settings.arch} with "
                        f"{setup.tile_labels.shape[1]} classes") from None
    setup.optimizer.load_state_dict(state["optimizer"])
    restore_scaler(setup.precision, state)
    setup.weights.load_state_dict(state["weights"])
    setup.targets.copy_(state["targets"])
    early.load_state_dict(state["early_stopping"])
    setup.sampler_probs = state["sampler_weights"].to(setup.targets.device)
    set_rng_state(state["rng_state"] if "rng_state" in state else state["rng"])
    results.truncate_after(state["epoch"])
    start_epoch = state["epoch"] + 1
    if state.get("stopped") or start_epoch > settings.epoch:
        logger.info(finished_line(last_path, state["epoch"], state.get("stopped"), f"--epoch {settings.epoch}"))
        start_epoch = settings.epoch + 1
    else:
        logger.info(f"resumed from {last_path} at epoch {start_epoch}")
    return (start_epoch, dict(state["best"]), dict(state["best_files"]), dict(state["last_val"]),
            dict(state["last_test"]))


def metric_function(settings):
    """Single-label runs add top-1 accuracy and the confusion matrix (utils/metrics.py)."""
    return singlelabel_metrics if settings.single_label else multilabel_metrics


def validate(model, loader, val, setup, *, settings, epoch):
    """Val metrics of the epoch: on tiles with their image's labels, or on images (max over tiles)."""
    val_probs = predict(model, loader, setup.preprocess, desc=f"epoch {epoch} val", precision=setup.precision)
    if settings.valLevel == "image":
        return metric_function(settings)(val.bag_labels, bag_max(val_probs, val.tile_bag, len(val.bags)))
    return metric_function(settings)(val.tile_labels, val_probs)


def evaluate_test(model, loader, test, setup, *, settings, writer, epoch):
    """Image-level test metrics of a new best model; writes its predictions (and confusion matrix)."""
    tile_probs = predict(model, loader, setup.preprocess, desc=f"epoch {epoch} test", precision=setup.precision)
    bag_probs = bag_max(tile_probs, test.tile_bag, len(test.bags))
    metrics = metric_function(settings)(test.bag_labels, bag_probs)
    write_tile_predictions(settings.run_dir / "test_tile_predictions.csv", test, tile_probs)
    write_predictions(settings.run_dir / "test_predictions.csv", test, bag_probs, single_label=settings.single_label)
    if settings.single_label:
        write_confusion(settings.run_dir / "confusion_matrix.csv", metrics["confusion_matrix"])
        writer.add_image("test/confusion_matrix", confusion_matrix_image(metrics["confusion_matrix"]),
                         epoch, dataformats="HWC")
    log_scalars(writer, "test", metrics, epoch)
    return metrics


def _all_zero_warning(epoch):
    return (f"epoch {epoch} | warning: every instance weight is zero, so the loss holds only the negative labels "
            "(training goes on, as in the reference; --sampling would stop here); lower --weight_lr")


def run(settings, command=None):
    """Train (or resume) one run; return ``{"best": ..., "val": ..., "test": ..., "run_dir": ...}``.

    ``command`` is the shell command that resumes the run, for the Ctrl-C message (default:
    this process's command line plus ``--loadModel``).
    """
    run_dir = settings.run_dir
    lock = claim_run_dir(run_dir, "--pathModelParams", hint="or choose another --pathModelParams")
    device = resolve_device(settings.device)
    early_logger, early_lines = buffered_logger("ana")  # held until output.txt opens
    tiles, num_classes = load_data(settings, early_logger)
    if missing_tile_caches(tiles, settings.imageSize, settings.cacheDir):
        check_output_dir(settings.cacheDir, "--cacheDir")
    resume_from = resume_point(run_dir, settings.loadModel, "--loadModel", started=("last.pt", "results.json"),
                               attempted=("args.json", "output.txt"))
    # the other family's last.pt, a data file, ...: say so now
    state = (load_checkpoint(resume_from, expected=("ana-run",), flag="--loadModel", mmap=True)
             if resume_from else None)
    # the model (and its pretrained weights) before anything is written: fail fast
    seed_everything(settings.seed, settings.deterministic)
    model = build_resnet_classifier(settings.arch, num_classes, settings.pretrained, settings.pretrainedWeights)
    if state is not None:  # a resume that cannot continue is refused before the run directory changes
        check_resumable(state, model, tiles["train"], settings, resume_from)
    info, device = init_distributed(device)  # torchrun: one process per GPU (or gloo on the CPU)
    with ExitStack() as stack:
        stack.callback(cleanup_distributed, info)
        check_global_batch(settings.trainBatchSize, info, "--trainBatchSize")
        # every image is decoded (a file truncated since the last run is found) before anything is written
        caches = build_tile_caches(tiles, settings.imageSize, settings.cacheDir, num_workers=settings.numWorkers,
                                   info=info)
        logger = stack.enter_context(open_run(run_dir, lock, info, "output.txt", device, "--loadModel",
                                              settings.epoch, command))
        early_lines.replay(logger)
        logger.info("settings " + json.dumps(dict(sorted((k, v) for k, v in vars(settings).items() if k != "flags")),
                                             default=str))
        # a resume keeps the original run's settings (output.txt logs the new ones)
        if (not settings.loadModel or not (run_dir / "args.json").is_file()) and info.is_main:
            write_json(run_dir / "args.json", settings_record(settings))
        for split, ts in tiles.items():
            logger.info(f"{split}: {describe(ts)}")
        log_keys = ("f1_mi", "f1_ma", "acc_total", "mAP", "overall") + (("top1_acc",) if settings.single_label else ())
        if settings.updateLR == "ulr-adaptive" and bool((tiles["train"].bag_labels.sum(dim=1) <= 1).all()):
            logger.info("note: every training image has one label, so ulr-adaptive gives every weight learning rate "
                        "0 and the weights keep their initial values (use --updateLR ulr-ones to let them move)")
        model = model.to(device)
        setup, loaders = build(settings, model, tiles, caches, device=device, info=info, logger=logger)
        save = main_only(save_checkpoint, info)
        results = ResultsFile(run_dir / "results.json") if info.is_main else NullResults()
        early = EarlyStopping(settings.patience)
        start_epoch, best, best_files, last_val, last_test = 1, {}, {}, {}, {}
        if settings.loadModel and resume_from is None:
            # the previous attempt died during its first epoch, after writing results.json
            results.truncate_after(0)
            logger.info(f"no last.pt in {run_dir}: the previous attempt did not finish an epoch; starting at epoch 1")
        elif resume_from is not None:
            start_epoch, best, best_files, last_val, last_test = resume(settings, setup, model, early, results, logger)
        # TensorBoard: created on first use; a resume hides what a killed attempt logged from start_epoch on
        writer = LazySummaryWriter(run_dir, purge_step=start_epoch if resume_from else None, enabled=info.is_main)
        stack.callback(writer.close)

        warned_zero = False
        for epoch in range(start_epoch, settings.epoch + 1):
            stats = train_epoch(setup, epoch)
            if stats["all_zero"] and not warned_zero:
                logger.warning(_all_zero_warning(epoch))
                warned_zero = True
            stats = mean_over_processes(stats, info, device,
                                        sum_keys=("images", "steps", "images_per_s", "skipped_batches"))
            if info.is_main:  # the main process validates; its metrics decide for every process
                last_val = validate(model, loaders["val"], tiles["val"], setup, settings=settings, epoch=epoch)
            last_val = broadcast_object(last_val, info)
            improved = best_improved(best, last_val, keys=tuple(BEST_METRICS))
            logger.info(f"epoch {epoch} | loss {stats['loss']:.4f} | {stats['images_per_s']:.1f} img/s | "
                        f"skipped {stats['skipped_batches']} | val {format_metrics(last_val, log_keys)}")
            if improved:
                best.update({k: last_val[k] for k in improved})
            if improved and info.is_main:
                last_test = evaluate_test(model, loaders["test"], tiles["test"], setup, settings=settings,
                                          writer=writer, epoch=epoch)
                write_instances(run_dir, tiles["train"], loaders["train"], setup)
                results.append({"epoch": epoch, "improved": improved, "val_results": last_val,
                                "test_results": last_test})
                logger.info(f"epoch {epoch} | new best {', '.join(improved)} | "
                            f"test {format_metrics(last_test, log_keys)}")
                if settings.saveModel:
                    keep_best_models(model, improved, best_files, run_dir, epoch)
            stop = early.step(bool(improved))
            log_epoch(settings, writer, logger, setup, stats, last_val, epoch)
            if info.enabled:  # DDP's invariant, and the gathered weight updates'; a failure is a bug
                if not replicas_in_sync([*model.parameters(), setup.weights.alpha], info):
                    raise RuntimeError("the processes' network or instance weights differ "
                                       "(distributed update out of sync)")
                if epoch == start_epoch:
                    logger.info(f"network and instance weights identical on the {info.world_size} processes")
            save({"epoch": epoch, "model": model.state_dict(), "optimizer": setup.optimizer.state_dict(),
                  "scaler": setup.precision.scaler.state_dict(), "weights": setup.weights.state_dict(),
                  "targets": setup.targets.cpu(), "early_stopping": early.state_dict(), "best": best,
                  "best_files": best_files, "rng_state": rng_state(), "stopped": stop,
                  "sampler_weights": setup.sampler_probs.cpu(), "last_val": last_val, "last_test": last_test,
                  "config": {k: v for k, v in settings.flags.items()
                             if isinstance(v, (str, int, float, bool, type(None)))},
                  "num_classes": num_classes}, run_dir / "last.pt")
            if stop:
                logger.info(f"early stopping: no val metric improved for {settings.patience} epochs")
                break
        if info.is_main:
            write_instances(run_dir, tiles["train"], loaders["train"], setup, suffix="_last")
        logger.info(f"done | best val {json.dumps({k: round(v, 4) for k, v in best.items()})}")
        return {"best": best, "val": last_val, "test": last_test, "run_dir": str(run_dir)}


@exit_on_user_error
def main(argv=None):
    """Parse ``argv`` (default: sys.argv), train, and return the final metrics dict."""
    args = build_parser().parse_args(argv)
    return run(resolve_settings(args, config), command=rerun_command(__file__, argv, add=("--loadModel",)))


if __name__ == "__main__":
    main()
