"""The ANA self-paced MIML training run shared by main.py and main_single.py.

``add_arguments(parser, cfg)`` declares the CLI (defaults from a config module) and
``run(args, cfg)`` trains: data -> tiles cache -> model + instance weights -> epochs of
train / validate (tiles) / test (bags, on each new best) -> output files.
"""
import argparse
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from datasets.ana import (CachedTileDataset, build_tile_cache, build_tileset, check_split_overlap, describe,
                          read_annotations, tile_cache_key)
from datasets.samplers import InstanceSampler, sampling_entropy
from models.backbones import RESNETS, build_resnet_classifier
from models.pseudo_labels import TRAINING_LABELS
from models.sample_weights import (GRANULARITIES, GROUPINGS, INIT_METHODS, LR_METHODS, WEIGHT_OPTIMIZERS,
                                  InstanceWeights, init_weights, weight_stats)
from utils.ana.epoch import BatchPreprocessor, EpochSetup, bag_max, predict, train_epoch
from utils.ana.instances import write_instance_weights, write_tile_montages, write_tile_predictions
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.checks import SEED_MAX, check_output_dir, float_arg, int_arg, range_problem
from utils.device import resolve_device
from utils.distributed import (DistInfo, barrier, broadcast_object, cleanup_distributed, init_distributed,
                               mean_over_processes, replicas_in_sync, wrap_ddp)
from utils.early_stopping import EarlyStopping
from utils.errors import UserError
from utils.figures import confusion_matrix_image
from utils.io import ResultsFile, atomic_write, write_json
from utils.logger import NullSummaryWriter, make_summary_writer
from utils.metrics import best_improved, format_metrics, multilabel_metrics, singlelabel_metrics
from utils.precision import make_precision, maybe_compile, memory_format
from utils.run import (check_global_batch, claim_run_dir, fast_path_line, finished_line, main_only, open_run,
                       restore_scaler)
from utils.seed import rng_state, seed_everything, seeded_loader, set_rng_state

# val metric key -> checkpoint file suffix of the reference code's README ({epoch}_f1mi.pt, ...)
BEST_METRICS = {"f1_mi": "f1mi", "f1_ma": "f1ma", "acc_total": "acc", "mAP": "mAP"}
# The range of every numeric flag: the argparse type (checked at parse time) and, for the
# defaults that come from the config module, _check_args.
ARG_TYPES = {
    "lr": float_arg(0, low_open=True), "weight_lr": float_arg(0), "weightDecay": float_arg(0),
    "epoch": int_arg(1), "trainBatchSize": int_arg(1), "testBatchSize": int_arg(1), "patience": int_arg(0),
    "resampleEvery": int_arg(1), "numClasses": int_arg(0),
    "imageSize": int_arg(32),  # the ResNet downsamples by 32
    "tileSize": int_arg(1), "numWorkers": int_arg(0), "seed": int_arg(0, SEED_MAX),
}


def add_arguments(parser, cfg):
    """Declare every flag of the reference code's README plus ours; defaults come from ``cfg``."""
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


def resolve_weight_lr(args, cfg):
    """``args`` with ``--weight_lr`` set to ``cfg.SGD_WEIGHT_LR`` for ``--weightOptimizer sgd``
    when the user gave no ``--weight_lr`` (a copy; ``args`` itself is unchanged)."""
    args = argparse.Namespace(**vars(args))
    if getattr(args, "weightOptimizer", "adam") == "sgd" and not getattr(args, "weight_lr_given", False):
        args.weight_lr = cfg.SGD_WEIGHT_LR
    return args


def weight_lr(args):
    """The instance weights' learning rate: ``--weight_lr``, or the network's ``--lr`` when None."""
    return args.lr if args.weight_lr is None else args.weight_lr


def default_run_name(args, cfg):
    """Run directory built from the hyperparameters, so different settings never collide."""
    sampling = "sampling" if args.sampling else "nosampling"
    wlr = f"{weight_lr(args):g}" + ("_sgd" if getattr(args, "weightOptimizer", "adam") == "sgd" else "")
    name = (f"{cfg.RUN_PREFIX}_{args.arch}_N{args.imageSize}_T{args.tileSize}_lr{args.lr:g}_wlr{wlr}_"
            f"{args.initWeight}_{args.updateLR}_{args.granularity}_{args.weightGroups}_{args.trainingLabel}_"
            f"{sampling}_val{args.valLevel}_bs{args.trainBatchSize}_seed{args.seed}")
    return Path(cfg.PATH_MODEL_ROOT) / name


def _describe_weights(weights, args):
    """Log line: how the weights are grouped for Adam and at which learning rates."""
    source = " (--lr)" if args.weight_lr is None else ""
    if args.weightOptimizer == "sgd" and not getattr(args, "weight_lr_given", False):
        source = " (the --weightOptimizer sgd default)"
    how = "Adam" if args.weightOptimizer == "adam" else "gradient steps (--weightOptimizer sgd)"
    if args.weightGroups == "one":
        return f"weights: {how}, one group, learning rate {weight_lr(args):g}{source}"
    rates = ", ".join(f"{lr:g}" for lr in weights.group_lr.tolist())
    return (f"weights: {how}, {len(weights.group_lr)} groups of tiles with the same label "
            f"{'count' if args.weightGroups == 'count' else 'set'}, learning rates {rates}{source}")


def _check_args(args, cfg):
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


def _keep_single_label(df, csv_path):
    """Rows of ``df`` with exactly one label, and a log line per split saying what was dropped."""
    keep = df["labels"].map(len) == 1
    notes = []
    for split in ("train", "val", "test"):
        in_split = df["Split"] == split
        dropped = int((in_split & ~keep).sum())
        notes.append(f"{csv_path} {split}: kept {int((in_split & keep).sum())} single-label rows, "
                     f"dropped {dropped} with more than one label")
    return df[keep].reset_index(drop=True), notes


def load_splits(args, cfg):
    """Read and validate the annotations and plan the tiles of each split (decodes nothing).

    Returns ``(tiles, num_classes, notes)``: a TileSet per split and lines for the run log.
    With ``cfg.SINGLE_LABEL`` only rows with exactly one label are kept (main_single.py).
    """
    ann_train = Path(args.annFile or cfg.PATH_TRAIN_ANNFILE)
    ann_test = Path(args.annFile or cfg.PATH_TEST_ANNFILE)
    dir_train = args.imageDir or cfg.DIR_TRAIN_IMAGES
    dir_test = args.imageDir or cfg.DIR_TEST_IMAGES
    num_classes = args.numClasses or None
    df_train, num_classes = read_annotations(ann_train, num_classes, args.bagColumn)
    df_test = df_train if ann_test == ann_train else read_annotations(ann_test, num_classes, args.bagColumn)[0]
    notes = []
    if cfg.SINGLE_LABEL:
        df_train, notes = _keep_single_label(df_train, ann_train)
        if ann_test == ann_train:
            df_test = df_train
        else:
            df_test, test_notes = _keep_single_label(df_test, ann_test)
            notes = notes[:2] + test_notes[2:]
    tiles = {}
    splits = (("train", df_train, dir_train, ann_train), ("val", df_train, dir_train, ann_train),
              ("test", df_test, dir_test, ann_test))
    notes += check_split_overlap([(split, df[df["Split"] == split], image_dir, csv)
                                  for split, df, image_dir, csv in splits],
                                 allow_overlap=getattr(args, "allowSplitOverlap", False))
    for split, df, image_dir, csv in splits:
        tiles[split] = build_tileset(df, split, image_dir, num_classes, args.tileSize, args.bagColumn, csv,
                                     what="single-label rows" if cfg.SINGLE_LABEL else "rows")
    return tiles, num_classes, notes


def _write_predictions(path, tileset, probs, num_classes, single_label):
    frame = pd.DataFrame({"path": tileset.bags["bag"].astype(str), "target": tileset.bags["TARGET"]})
    if single_label:
        frame["pred"] = probs.argmax(dim=1).numpy()
    for k in range(num_classes):
        frame[f"prob_{k}"] = probs[:, k].numpy()
    atomic_write(path, lambda f: frame.to_csv(f, index=False), mode="w")


def _write_confusion(path, matrix):
    """``confusion_matrix.csv``: rows ``true_k``, columns ``pred_k`` (counts)."""
    n = len(matrix)
    frame = pd.DataFrame(matrix, index=[f"true_{k}" for k in range(n)], columns=[f"pred_{k}" for k in range(n)])
    atomic_write(path, lambda f: frame.to_csv(f, index_label="class"), mode="w")


def _log_scalars(writer, prefix, values, step):
    for key, value in values.items():
        if isinstance(value, (int, float)) and value == value:
            writer.add_scalar(f"{prefix}/{key}", value, step)


def run(args, cfg, command=None):
    """Train (or resume) one run; return ``{"best": ..., "val": ..., "test": ...}`` metrics.

    ``command`` is the shell command that resumes the run, for the Ctrl-C message (default:
    this process's command line plus ``--loadModel``).
    """
    _check_args(args, cfg)
    args = resolve_weight_lr(args, cfg)
    run_dir = Path(args.pathModelParams) if args.pathModelParams else default_run_name(args, cfg)
    lock = claim_run_dir(run_dir, "--pathModelParams", hint="or choose another --pathModelParams")
    device = resolve_device(args.device)
    tiles, num_classes, notes = load_splits(args, cfg)
    # the tile cache is written only when a split's file is missing (a complete read-only cache is fine)
    if not all((Path(args.cacheDir) / tile_cache_key(ts, args.imageSize)).is_file() for ts in tiles.values()):
        check_output_dir(args.cacheDir, "--cacheDir")
    last_path = run_dir / "last.pt"
    started = last_path.is_file() or (run_dir / "results.json").is_file()
    attempted = started or (run_dir / "args.json").is_file() or (run_dir / "output.txt").is_file()
    if args.loadModel and not attempted:
        raise UserError(f"--loadModel: {last_path} does not exist (nothing to resume; drop --loadModel to start a new run)")
    if not args.loadModel and started:
        raise UserError(f"run directory {run_dir} already holds a run; pass --loadModel to resume it "
                        f"or choose another --pathModelParams")
    state = None
    if args.loadModel and last_path.is_file():  # the other family's last.pt, a data file, ...: say so now
        state = load_checkpoint(last_path, expected=("ana-run",), flag="--loadModel", mmap=True)
    # the model (and its pretrained weights) before anything is written: fail fast
    seed_everything(args.seed, args.deterministic)
    model = build_resnet_classifier(args.arch, num_classes, args.pretrained, args.pretrainedWeights)
    if state is not None:  # a resume that cannot continue is refused before the run directory changes
        _check_resumable(state, model, tiles["train"], num_classes, args, last_path)
    info, device = init_distributed(device)  # torchrun: one process per GPU (or gloo on the CPU)
    writer = None
    try:
        check_global_batch(args.trainBatchSize, info, "--trainBatchSize")
        # every image is decoded (a file truncated since the last run is found) before anything is written
        caches = _tile_caches(args, tiles, info)
        with open_run(run_dir, lock, info, "output.txt", device, "--loadModel", args.epoch, command) as logger:
            writer = make_summary_writer(run_dir) if info.is_main else NullSummaryWriter()
            for note in notes:
                logger.info(note)
            return _train(args, cfg, device, model.to(device), tiles, caches, num_classes, run_dir, logger, writer,
                          info)
    finally:
        if writer is not None:
            writer.close()
        cleanup_distributed(info)


def _check_resumable(state, model, train, num_classes, args, last_path):
    """Refuse a resume whose last.pt does not fit the model (--arch, the classes) or the training tiles
    (the annotations or images changed, or --granularity): what would otherwise fail mid-way
    through loading it, after the run's log had grown."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError):
        raise UserError(f"{last_path} holds a different model than --arch {args.arch} with "
                        f"{num_classes} classes") from None
    saved, now = tuple(state["targets"].shape), tuple(train.tile_labels.shape)
    if saved != now:
        raise UserError(f"{last_path} was trained on {saved[0]} training tiles of {saved[1]} classes, the data now "
                        f"give {now[0]} of {now[1]}: a resumed run keeps its data (restore the annotations and "
                        f"images, or start a new run in another --pathModelParams)")
    alpha = init_weights(train.tile_labels, args.initWeight, args.granularity)
    if tuple(state["weights"]["alpha"].shape) != tuple(alpha.shape):
        raise UserError(f"{last_path} holds sample weights of shape {tuple(state['weights']['alpha'].shape)}, "
                        f"--granularity {args.granularity} gives {tuple(alpha.shape)}: resume with the run's "
                        f"--granularity")


def _tile_caches(args, tiles, info):
    """The tile cache file of every split (the main process decodes the tiles, the others then reuse its cache)."""
    caches = {}
    for first in (True, False):
        if first == info.is_main:
            caches = {split: build_tile_cache(ts, args.imageSize, args.cacheDir, args.numWorkers, desc=split)
                      for split, ts in tiles.items()}
        barrier(info)
    return caches


class _NullResults:
    def append(self, record):
        pass

    def truncate_after(self, epoch):
        pass


def run_settings(args, cfg):
    """Every setting of the run, for args.json: the flags, the resolved weight learning rate and
    the config module's constants that are not flags."""
    return {**vars(args), "weight_lr_used": weight_lr(args), "config_module": cfg.__name__,
            "MEAN": list(cfg.MEAN), "STD": list(cfg.STD), "SINGLE_LABEL": bool(cfg.SINGLE_LABEL)}


def _build(args, cfg, device, model, tiles, caches, num_classes, logger, info):
    """The run's objects: optimiser, instance weights, sampler, loaders, fast path, epoch setup."""
    logger.info(f"model {args.arch}, {num_classes} classes, "
                + ("ImageNet-pretrained" if args.pretrained else "random initialisation (--no-pretrained)"))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weightDecay)
    train = tiles["train"]
    tile_labels = train.tile_labels.to(device)
    targets = tile_labels.clone()
    weights = InstanceWeights(init_weights(train.tile_labels, args.initWeight, args.granularity), targets,
                              lr=weight_lr(args), update_lr=args.updateLR, grouping=args.weightGroups,
                              weight_decay=args.weightDecay, optimizer=args.weightOptimizer).to(device)
    logger.info(_describe_weights(weights, args))
    sampler = InstanceSampler(len(train), seed=args.seed, num_replicas=info.world_size, rank=info.rank)
    loader = functools.partial(seeded_loader, device=device, num_workers=args.numWorkers, seed=args.seed)
    # --trainBatchSize is the global batch: each process takes its share
    loaders = {"train": loader(CachedTileDataset(caches["train"]), batch_size=args.trainBatchSize // info.world_size,
                               sampler=sampler)}
    for split in ("val", "test"):
        loaders[split] = loader(CachedTileDataset(caches[split]), batch_size=args.testBatchSize)
    # GPU fast path (utils/precision.py; no-ops on the CPU); cudnn.benchmark is set by seed_everything
    fmt = memory_format(device, args.channelsLast)
    model.to(memory_format=fmt)
    precision = make_precision(device, args.amp)
    train_model = maybe_compile(wrap_ddp(model, info, device), args.compile)
    logger.info(fast_path_line(precision, fmt, args.compile))
    preprocess = BatchPreprocessor(cfg.MEAN, cfg.STD, device, memory_format=fmt)
    setup = EpochSetup(train_model, loaders["train"], sampler, optimizer, weights, tile_labels, targets, preprocess,
                       precision, granularity=args.granularity, training_label=args.trainingLabel,
                       sampling=args.sampling, resample_every=args.resampleEvery,
                       reset_optimizer=args.resetOptimizer, dist_info=info)
    return setup, loaders


def _resume(args, setup, model, num_classes, run_dir, early, results, logger):
    """Load last.pt into the run's objects; return ``(start_epoch, best, best_files, last_val, last_test)``."""
    state = load_checkpoint(run_dir / "last.pt", map_location=setup.targets.device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{run_dir / 'last.pt'} holds a different model than --arch {args.arch} with "
                        f"{num_classes} classes") from None
    setup.optimizer.load_state_dict(state["optimizer"])
    restore_scaler(setup.precision, state)
    setup.weights.load_state_dict(state["weights"])
    setup.targets.copy_(state["targets"])
    early.load_state_dict(state["early_stopping"])
    setup.sampler_probs = state["sampler_weights"].to(setup.targets.device)
    set_rng_state(state["rng"])
    results.truncate_after(state["epoch"])
    start_epoch = state["epoch"] + 1
    if state.get("stopped") or start_epoch > args.epoch:
        logger.info(finished_line(run_dir / "last.pt", state["epoch"], state.get("stopped"), f"--epoch {args.epoch}"))
        start_epoch = args.epoch + 1
    else:
        logger.info(f"resumed from {run_dir / 'last.pt'} at epoch {start_epoch}")
    return (start_epoch, dict(state["best"]), dict(state["best_files"]), dict(state["last_val"]),
            dict(state["last_test"]))


def _train(args, cfg, device, model, tiles, caches, num_classes, run_dir, logger, writer, info=DistInfo()):
    logger.info("args " + json.dumps(dict(sorted(vars(args).items())), default=str))
    # a resume keeps the original run's settings (output.txt logs the new ones)
    if (not args.loadModel or not (run_dir / "args.json").is_file()) and info.is_main:
        write_json(run_dir / "args.json", run_settings(args, cfg))
    for split, ts in tiles.items():
        logger.info(f"{split}: {describe(ts)}")
    single = cfg.SINGLE_LABEL
    metric_fn = singlelabel_metrics if single else multilabel_metrics
    log_keys = ("f1_mi", "f1_ma", "acc_total", "mAP", "overall") + (("top1_acc",) if single else ())
    if args.updateLR == "ulr-adaptive" and bool((tiles["train"].bag_labels.sum(dim=1) <= 1).all()):
        logger.info("note: every training image has one label, so ulr-adaptive gives every weight learning rate "
                    "0 and the weights keep their initial values (use --updateLR ulr-ones to let them move)")
    setup, loaders = _build(args, cfg, device, model, tiles, caches, num_classes, logger, info)
    weights, tile_labels = setup.weights, setup.tile_labels
    save = main_only(save_checkpoint, info)
    results = ResultsFile(run_dir / "results.json") if info.is_main else _NullResults()
    early = EarlyStopping(args.patience)
    start_epoch, best, best_files, last_val, last_test = 1, {}, {}, {}, {}
    if args.loadModel and not (run_dir / "last.pt").is_file():
        # the previous attempt died during its first epoch, after writing results.json
        results.truncate_after(0)
        logger.info(f"no last.pt in {run_dir}: the previous attempt did not finish an epoch; starting at epoch 1")
    elif args.loadModel:
        start_epoch, best, best_files, last_val, last_test = _resume(args, setup, model, num_classes, run_dir, early,
                                                                     results, logger)

    warned_zero = False
    for epoch in range(start_epoch, args.epoch + 1):
        stats = train_epoch(setup, epoch)
        if stats["all_zero"] and not warned_zero:
            logger.warning(f"epoch {epoch} | warning: every instance weight is zero, so the loss holds only the "
                           "negative labels (training goes on, as in the reference; --sampling would stop here); "
                           "lower --weight_lr")
            warned_zero = True
        stats = mean_over_processes(stats, info, device, sum_keys=("images", "steps", "images_per_s", "skipped_batches"))
        if info.is_main:  # the main process validates; its metrics decide for every process
            val = tiles["val"]
            val_probs = predict(model, loaders["val"], setup.preprocess, desc=f"epoch {epoch} val",
                                precision=setup.precision)
            if args.valLevel == "image":
                last_val = metric_fn(val.bag_labels, bag_max(val_probs, val.tile_bag, len(val.bags)))
            else:
                last_val = metric_fn(val.tile_labels, val_probs)
        last_val = broadcast_object(last_val, info)
        improved = best_improved(best, last_val, keys=tuple(BEST_METRICS))
        logger.info(f"epoch {epoch} | loss {stats['loss']:.4f} | {stats['images_per_s']:.1f} img/s | "
                    f"skipped {stats['skipped_batches']} | val {format_metrics(last_val, log_keys)}")
        if improved:
            best.update({k: last_val[k] for k in improved})
        if improved and info.is_main:
            last_test = _test_best(args, model, tiles["test"], loaders["test"], setup, metric_fn, single, num_classes,
                                   run_dir, writer, epoch)
            _write_instances(run_dir, tiles["train"], loaders["train"], setup)
            results.append({"epoch": epoch, "improved": improved, "val_results": last_val, "test_results": last_test})
            logger.info(f"epoch {epoch} | new best {', '.join(improved)} | test {format_metrics(last_test, log_keys)}")
            if args.saveModel:
                _keep_best_models(model, improved, best_files, run_dir, epoch)
        stop = early.step(bool(improved))
        _log_epoch(args, writer, logger, setup, stats, last_val, epoch)
        if info.enabled:  # DDP's invariant, and the gathered weight updates'; a failure is a bug
            if not replicas_in_sync([*model.parameters(), weights.alpha], info):
                raise RuntimeError("the processes' network or instance weights differ (distributed update out of sync)")
            if epoch == start_epoch:
                logger.info(f"network and instance weights identical on the {info.world_size} processes")
        save({"epoch": epoch, "model": model.state_dict(), "optimizer": setup.optimizer.state_dict(),
              "scaler": setup.precision.scaler.state_dict(), "weights": weights.state_dict(),
              "targets": setup.targets.cpu(), "early_stopping": early.state_dict(), "best": best,
              "best_files": best_files, "rng": rng_state(), "stopped": stop,
              "sampler_weights": setup.sampler_probs.cpu(), "last_val": last_val, "last_test": last_test,
              "config": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
              "num_classes": num_classes}, run_dir / "last.pt")
        if stop:
            logger.info(f"early stopping: no val metric improved for {args.patience} epochs")
            break
    if info.is_main:
        _write_instances(run_dir, tiles["train"], loaders["train"], setup, suffix="_last")
    logger.info(f"done | best val {json.dumps({k: round(v, 4) for k, v in best.items()})}")
    return {"best": best, "val": last_val, "test": last_test, "run_dir": str(run_dir)}


def _test_best(args, model, test, test_loader, setup, metric_fn, single, num_classes, run_dir, writer, epoch):
    """Image-level test metrics of a new best model; writes its predictions (and confusion matrix)."""
    tile_probs = predict(model, test_loader, setup.preprocess, desc=f"epoch {epoch} test", precision=setup.precision)
    bag_probs = bag_max(tile_probs, test.tile_bag, len(test.bags))
    metrics = metric_fn(test.bag_labels, bag_probs)
    write_tile_predictions(run_dir / "test_tile_predictions.csv", test, tile_probs)
    _write_predictions(run_dir / "test_predictions.csv", test, bag_probs, num_classes, single)
    if single:
        _write_confusion(run_dir / "confusion_matrix.csv", metrics["confusion_matrix"])
        writer.add_image("test/confusion_matrix", confusion_matrix_image(metrics["confusion_matrix"]),
                         epoch, dataformats="HWC")
    _log_scalars(writer, "test", metrics, epoch)
    return metrics


def _write_instances(run_dir, train, train_loader, setup, suffix=""):
    """``instance_weights{suffix}.csv`` and ``instance_tiles/class{k}{suffix}.png`` of the current weights."""
    frame = write_instance_weights(run_dir / f"instance_weights{suffix}.csv", train, setup.weights.alpha,
                                   setup.targets)
    write_tile_montages(run_dir / "instance_tiles", frame, np.load(train_loader.dataset.cache_path, mmap_mode="r"),
                        suffix=suffix)


def _keep_best_models(model, improved, best_files, run_dir, epoch):
    """--saveModel: ``{epoch}_{metric}.pt`` for each improved metric, replacing that metric's older file."""
    for key in improved:
        name = f"{epoch}_{BEST_METRICS[key]}.pt"
        save_checkpoint(model.state_dict(), run_dir / name)
        old = best_files.get(key)
        if old and old != name and (run_dir / old).is_file():
            (run_dir / old).unlink()
        best_files[key] = name


def _log_epoch(args, writer, logger, setup, stats, val, epoch):
    """TensorBoard scalars of the epoch and output.txt's ``weights mean M dropped D`` line."""
    weights, tile_labels = setup.weights, setup.tile_labels
    wstats = weight_stats(weights.alpha, tile_labels)
    _log_scalars(writer, "train", {k: stats[k] for k in ("loss", "images_per_s", "skipped_batches")}, epoch)
    writer.add_scalar("train/lr", setup.optimizer.param_groups[0]["lr"], epoch)
    writer.add_scalar("train/weight_lr", weight_lr(args), epoch)
    _log_scalars(writer, "val", val, epoch)
    _log_scalars(writer, "weights", wstats, epoch)
    entropy = sampling_entropy(setup.sampler_probs) if args.sampling else 1.0  # 1 = uniform (shuffling)
    writer.add_scalar("sampler/entropy", entropy, epoch)
    writer.add_histogram("weights/alpha", weights.alpha[tile_labels > 0] if weights.alpha.dim() == 2
                         else weights.alpha, epoch)
    logger.info(f"epoch {epoch} | weights mean {wstats['mean']:.4f} dropped {wstats['dropped_fraction']:.3f}"
                + (f" | sampler entropy {entropy:.3f}" if args.sampling else ""))
