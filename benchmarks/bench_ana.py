"""Training and test throughput of main.py's ANA method against a plain BCE loop.

    python benchmarks/bench_ana.py                       # CPU: resnet18 on 64 px tiles, ~1 min
    python benchmarks/bench_ana.py --device cuda         # GPU: resnet50 on 224 px tiles (the paper's setting)

In one process, on the same generated data (``datasets.synthetic_ana``), the same model object,
the same DataLoader settings (``utils.seed.seeded_loader``: cached tiles, workers, pinned memory
on CUDA, persistent workers), the same batch size and main.py's fast path for both (``--amp``:
bf16 autocast, or fp16 + GradScaler, on a GPU; ``--channels-last``; cuDNN autotuning; all of them
no-ops on the CPU, where main.py trains in float32), it times:

- **ANA method**: main.py's full model (``--initWeight iw-sample --updateLR ulr-adaptive
  --granularity label --sampling --trainingLabel pseudo``), run by the trainer's own epoch
  function ``utils.ana.epoch.train_epoch``: the weighted instance sampler recomputed every
  epoch, ``train_one_epoch`` (pseudo-labels, weighted BCE, the network's Adam and the
  instance weights' per-group Adam over all rows of the groups in the batch), and the
  ``ulr-adaptive`` regrouping after the epoch;
- **plain BCE**: the same model, loader (shuffled), preprocessing (normalise + random flip on the
  device) and Adam, with ``BCEWithLogitsLoss`` on the tiles' bag labels and, like
  ``train_one_epoch``, no host synchronisation per step, so the difference is the method's own work;
- **test**: ``predict`` + ``bag_max`` on the test split (bag-level evaluation), images/s.

One untimed warm-up epoch (and test pass) per path comes first (worker start-up, cuDNN autotuning,
allocator). The timed epochs of the two paths alternate (method, plain, plain, method, ...) so
that a machine whose speed drifts favours neither. An epoch's *data* time is the time spent
waiting for the next batch from the DataLoader (``iter`` included); *compute* is the rest. On a
GPU every timed span starts and ends with ``torch.cuda.synchronize``.

On a CPU shared with other jobs the wall clock moves by tens of percent from one epoch to the
next (the environment line shows the load average). Two rows help to judge a result: the ratio
per timed epoch (min .. max), and the main process's CPU time, which other jobs barely change
(on a CPU the network runs in the main process; on a GPU that process mostly waits, so read the
wall-clock rows there).

Targets: method overhead <= 10 % of the plain loop's time per image; the data wait a
small part of an epoch (data loading hidden behind compute).

Prints an environment line and one table (stdout); ``main()`` returns the numbers as a dict.
"""
import argparse
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import config
from benchmarks.common import add_fast_path_flags
from datasets.ana import CachedTileDataset, build_tile_cache
from datasets.samplers import InstanceSampler
from datasets.synthetic_ana import generate_ana_demo
from main import build_parser as build_main_parser
from main import load_data, resolve_settings, weight_lr
from models.backbones import RESNETS, build_resnet_classifier
from models.sample_weights import InstanceWeights, init_weights
from utils.ana.epoch import BatchPreprocessor, EpochSetup, bag_max, predict, train_epoch
from utils.device import resolve_device
from utils.errors import exit_on_user_error
from utils.precision import configure_backends, make_precision, maybe_compile, memory_format
from utils.seed import seed_everything, seeded_loader

# main.py's full model (config.py and the README: "the recommended full model")
FULL_METHOD = ("--initWeight", "iw-sample", "--updateLR", "ulr-adaptive", "--granularity", "label",
               "--sampling", "--trainingLabel", "pseudo")
NUM_CLASSES = 8      # the ANA classes of config.py
MAX_LABELS = 3       # labels per generated image, so --updateLR ulr-adaptive has weights to move
MIN_IMAGES = math.ceil(NUM_CLASSES / MAX_LABELS)  # per split, so that every class occurs in it
LR = 1e-3            # network and weight learning rate (speed does not depend on it)
# (arch, image size, batch size, training images) when the flag is not given
DEFAULTS = {"cpu": ("resnet18", 64, 16, 192), "cuda": ("resnet50", 224, 64, 512)}


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def build_parser():
    p = argparse.ArgumentParser(
        description="Images/s of main.py's ANA method vs a plain BCE loop on the same data, model and batch "
                    "size; epoch time split into data wait and compute; bag-level test throughput.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--arch", choices=RESNETS, default=None,
                   help="backbone (default: resnet18 on the CPU, resnet50 on a GPU as config.py)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="tile side fed to the network (default: 64 on the CPU to stay within minutes, "
                        "224 on a GPU as main.py)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="training and test batch size (default: 16 on the CPU, 64 on a GPU)")
    p.add_argument("--num-workers", type=non_negative_int, default=2,
                   help="DataLoader workers, as main.py's --numWorkers (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=4,
                   help="timed epochs per path, after one warm-up epoch (default: %(default)s)")
    p.add_argument("--n-train", type=positive_int, default=None,
                   help="generated training images of 2x2 tiles each (default: 192 on the CPU, 512 on a GPU); "
                        "at least 3, so that every class occurs")
    p.add_argument("--n-test", type=positive_int, default=16,
                   help="generated test images (bags) of 2x2 tiles each (default: %(default)s); at least 3")
    add_fast_path_flags(p, "main.py", "--amp", "--channelsLast", "the data, model and samplers")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model for both paths, as main.py's --compile (default: off; the "
                        "warm-up epoch then includes the compilation)")
    return p


def environment_line(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine() or "cpu"
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"  # other jobs sharing the machine
    return (f"env: torch {torch.__version__} | python {platform.python_version()} | device {device} ({name}) | "
            f"torch threads {torch.get_num_threads()} | cpus {os.cpu_count()} | load {load}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedLoader:
    """Wraps a DataLoader; adds up the time spent waiting for the next batch, and counts images."""

    def __init__(self, loader):
        self.loader = loader
        self.wait = 0.0
        self.images = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        tic = time.perf_counter()
        batches = iter(self.loader)  # with persistent workers: wakes them and primes the prefetch
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                self.wait += time.perf_counter() - tic
                return
            self.wait += time.perf_counter() - tic
            self.images += len(batch[1])
            yield batch
            tic = time.perf_counter()


class AnaMethod:
    """main.py's full method: the trainer's own ``EpochSetup`` + ``train_epoch`` (sampler refresh,
    ``train_one_epoch``, the weights' end-of-epoch update); one call = one epoch.

    Validation, test and checkpointing of the run are left out: they are not training throughput.
    """

    name = "ANA method"

    def __init__(self, args, model, train_tiles, cache, device, batch_size, num_workers, fast):
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weightDecay)
        tile_labels = train_tiles.tile_labels.to(device)
        targets = tile_labels.clone()
        weights = InstanceWeights(init_weights(train_tiles.tile_labels, args.initWeight, args.granularity), targets,
                                  lr=weight_lr(args), update_lr=args.updateLR, grouping=args.weightGroups,
                                  weight_decay=args.weightDecay).to(device)
        sampler = InstanceSampler(len(train_tiles), seed=args.seed)
        self.loader = TimedLoader(seeded_loader(CachedTileDataset(cache), device, num_workers, args.seed, batch_size=batch_size,
                                               sampler=sampler))
        preprocess = BatchPreprocessor(config.MEAN, config.STD, device, memory_format=fast["memory_format"])
        self.setup = EpochSetup(model=model, optimizer=optimizer, weights=weights, loader=self.loader,
                                tile_labels=tile_labels, targets=targets, preprocess=preprocess, sampler=sampler,
                                precision=fast["precision"], granularity=args.granularity,
                                training_label=args.trainingLabel, sampling=args.sampling,
                                resample_every=args.resampleEvery,
                                reset_optimizer=args.resetOptimizer)

    def __call__(self, epoch):
        train_epoch(self.setup, epoch)


class PlainBCE:
    """The baseline: shuffled tiles, ``BCEWithLogitsLoss`` on the tiles' bag labels, Adam."""

    name = "plain BCE"

    def __init__(self, args, model, train_tiles, cache, device, batch_size, num_workers, fast):
        self.model, self.precision = model, fast["precision"]
        self.optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                          weight_decay=args.weightDecay)
        self.tile_labels = train_tiles.tile_labels.to(device)
        self.sampler = InstanceSampler(len(train_tiles), seed=args.seed)  # no weights: a shuffle
        self.loader = TimedLoader(seeded_loader(CachedTileDataset(cache), device, num_workers, args.seed,
                                               batch_size=batch_size, sampler=self.sampler))
        self.preprocess = BatchPreprocessor(config.MEAN, config.STD, device, memory_format=fast["memory_format"])
        self.criterion = torch.nn.BCEWithLogitsLoss()
        self.device = device

    def __call__(self, epoch):
        self.sampler.set_epoch(epoch)
        self.model.train()
        losses = []  # summed on the device and checked once per epoch, as train_one_epoch does
        for x, idx in self.loader:
            idx = idx.to(self.device, non_blocking=True)
            x = self.preprocess(x, train=True)
            with self.precision.autocast():  # the trainer's precision: autocast forward, float32 loss
                logits = self.model(x)
            loss = self.criterion(logits.float(), self.tile_labels[idx])
            self.optimizer.zero_grad(set_to_none=True)
            scaler = self.precision.scaler
            scaler.scale(loss).backward()
            scaler.step(self.optimizer)
            scaler.update()
            losses.append(loss.detach())
        if losses and not bool(torch.isfinite(torch.stack(losses)).all()):
            raise RuntimeError("plain BCE loss became non-finite")


def timed_epoch(run, epoch, device):
    """Run one epoch of ``run``; returns (seconds, seconds waiting for data, images, CPU seconds).

    The CPU seconds are this process's (all its threads, not the DataLoader workers): unlike the
    wall clock they barely move when other jobs share the machine's cores.
    """
    wait0, images0 = run.loader.wait, run.loader.images
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    run(epoch)
    sync(device)
    return (time.perf_counter() - start, run.loader.wait - wait0, run.loader.images - images0,
            time.process_time() - cpu_start)


def timed_test(model, loader, tiles, preprocess, device, precision=None):
    """One bag-level evaluation (``predict`` + ``bag_max``); returns seconds."""
    sync(device)
    start = time.perf_counter()
    bag_max(predict(model, loader, preprocess, desc="test", precision=precision), tiles.tile_bag, len(tiles.bags))
    sync(device)
    return time.perf_counter() - start


def _fmt(value, digits=1):
    return f"{value:.{digits}f}"


def print_table(env, settings, r):
    rows = [
        ("train images/s", _fmt(r["method_images_per_s"]), _fmt(r["plain_images_per_s"]),
         _fmt(r["method_images_per_s"] / r["plain_images_per_s"], 3)),
        ("epoch time (s)", _fmt(r["method_epoch_s"], 2), _fmt(r["plain_epoch_s"], 2),
         _fmt(r["method_epoch_s"] / r["plain_epoch_s"], 3)),
        ("  data wait (s)", _fmt(r["method_data_s"], 3), _fmt(r["plain_data_s"], 3), ""),
        ("  compute (s)", _fmt(r["method_compute_s"], 2), _fmt(r["plain_compute_s"], 2),
         _fmt(r["method_compute_s"] / r["plain_compute_s"], 3)),
        ("  data wait (% of epoch)", _fmt(100 * r["method_data_fraction"]), _fmt(100 * r["plain_data_fraction"]), ""),
        ("main-process CPU time (s)", _fmt(r["method_cpu_s"], 2), _fmt(r["plain_cpu_s"], 2),
         _fmt(r["cpu_time_ratio"], 3)),
        ("time per image, method/plain: median of epochs", "", "", _fmt(r["time_ratio"], 3)),
        ("  per epoch: min .. max; all epochs pooled", "", "",
         f"{r['time_ratio_min']:.3f} .. {r['time_ratio_max']:.3f}; {r['time_ratio_pooled']:.3f}"),
        ("method overhead (target <= 10%)", "", "", f"{r['overhead_pct']:+.1f}%"),
        ("test images/s (predict + bag_max)", _fmt(r["test_images_per_s"]), "", ""),
        ("test bags/s", _fmt(r["test_bags_per_s"]), "", ""),
    ]
    head = ("measure", "ANA method", "plain BCE", "method/plain")
    widths = [max(len(row[i]) for row in rows + [head]) for i in range(4)]

    def line(cells):  # first column left-aligned, numbers right-aligned
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    print(env)
    print(settings)
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def measure(args, arch, image_size, batch_size, n_train, device, tmp):
    """Generate the data in ``tmp``, then time both training paths and the test; returns the raw numbers."""
    tile_size = max(image_size, 32)  # source tiles as large as the network input: the cache resizes nothing
    ann = generate_ana_demo(tmp / "data", n_train=n_train, n_val=MIN_IMAGES, n_test=args.n_test, tiles_x=2,
                            tiles_y=2, tile_size=tile_size, num_classes=NUM_CLASSES, max_labels=MAX_LABELS,
                            seed=args.seed)
    # main.py's own parser and split loading, with the full method's flags
    ana_args = build_main_parser().parse_args(
        ["--annFile", str(ann), "--imageDir", str(tmp / "data" / "images"), "--numClasses", str(NUM_CLASSES),
         "--arch", arch, "--imageSize", str(image_size), "--tileSize", str(tile_size), "--no-pretrained",
         "--trainBatchSize", str(batch_size), "--testBatchSize", str(batch_size),
         "--numWorkers", str(args.num_workers), "--lr", str(LR), "--weight_lr", str(LR),
         "--seed", str(args.seed), "--cacheDir", str(tmp / "cache"), *FULL_METHOD])
    tiles, num_classes = load_data(resolve_settings(ana_args, config), logging.getLogger("bench_ana"))
    caches = {split: build_tile_cache(tiles[split], image_size, tmp / "cache", args.num_workers, desc=split)
              for split in ("train", "test")}

    # main.py's fast path (main.build), the same for both paths: precision, memory format
    fast = {"precision": make_precision(device, args.amp), "memory_format": memory_format(device, args.channels_last)}
    configure_backends(device)
    model = build_resnet_classifier(arch, num_classes).to(device, memory_format=fast["memory_format"])
    train_model = maybe_compile(model, args.compile)  # as main.py: the compiled wrapper trains, the module predicts
    common = (tiles["train"], caches["train"], device, batch_size, args.num_workers, fast)
    # both paths train this one model, taking turns (each with its own Adam): the same parameter
    # tensors in the same memory, so the comparison does not depend on where two copies landed
    # (with two copies, the ratio moved by +-10% from run to run on a 2-core VM)
    runs = [AnaMethod(ana_args, train_model, *common), PlainBCE(ana_args, train_model, *common)]
    test = tiles["test"]
    test_loader = seeded_loader(CachedTileDataset(caches["test"]), device, args.num_workers, args.seed,
                                batch_size=batch_size)
    test_preprocess = BatchPreprocessor(config.MEAN, config.STD, device, memory_format=fast["memory_format"])

    print(f"bench_ana: {len(tiles['train'])} training tiles, {len(test)} test tiles; "
          f"1 warm-up + {args.epochs} timed epochs per path", file=sys.stderr)
    for run in runs:  # warm-up, untimed
        run(0)
    epochs = {run.name: [] for run in runs}  # (seconds, data wait, images, CPU seconds) per timed epoch
    for epoch in range(1, args.epochs + 1):
        for run in (runs if epoch % 2 else runs[::-1]):
            epochs[run.name].append(timed_epoch(run, epoch, device))
    timed_test(model, test_loader, test, test_preprocess, device, fast["precision"])  # warm-up
    test_s = sum(timed_test(model, test_loader, test, test_preprocess, device, fast["precision"])
                 for _ in range(args.epochs))
    return {"precision": fast["precision"].describe(), "channels_last": fast["memory_format"] == torch.channels_last,
            "compile": bool(args.compile),
            "epochs": epochs, "train_tiles": len(tiles["train"]), "test_tiles": len(test),
            "test_bags": len(test.bags), "test_s": test_s, "tile_size": tile_size}


@exit_on_user_error
def main(argv=None):
    """Parse ``argv``, run the benchmark, print the table and return its numbers as a dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--n-train", args.n_train), ("--n-test", args.n_test)):
        if value is not None and value < MIN_IMAGES:
            parser.error(f"{flag} {value}: need at least {MIN_IMAGES} images so that every class occurs")
    device = resolve_device(args.device)
    d_arch, d_size, d_batch, d_train = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    arch = args.arch or d_arch
    image_size = args.image_size or d_size
    batch_size = args.batch_size or d_batch
    n_train = args.n_train or d_train
    seed_everything(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_ana_") as tmp:
        # the loaders (and their persistent workers) end with measure(), before the cache is deleted
        raw = measure(args, arch, image_size, batch_size, n_train, device, Path(tmp))

    result = {"train_tiles": raw["train_tiles"], "test_tiles": raw["test_tiles"]}
    for key, name in (("method", AnaMethod.name), ("plain", PlainBCE.name)):
        seconds, wait, images, cpu = (sum(column) for column in zip(*raw["epochs"][name]))
        result.update({f"{key}_images_per_s": images / seconds, f"{key}_epoch_s": seconds / args.epochs,
                       f"{key}_data_s": wait / args.epochs, f"{key}_compute_s": (seconds - wait) / args.epochs,
                       f"{key}_data_fraction": wait / seconds, f"{key}_cpu_s": cpu / args.epochs})
    # time per image of the method over the plain loop's, per pair of neighbouring timed epochs;
    # the median of the pairs is the headline (one epoch slowed by another job moves it little),
    # the pooled ratio (all epochs' time over all epochs' images) and the spread are shown too
    pairs = [(m[0] / m[2]) / (p[0] / p[2]) for m, p in zip(raw["epochs"][AnaMethod.name], raw["epochs"][PlainBCE.name])]
    result["time_ratio"] = statistics.median(pairs)
    result["time_ratio_pooled"] = result["plain_images_per_s"] / result["method_images_per_s"]
    result["time_ratio_min"], result["time_ratio_max"] = min(pairs), max(pairs)
    result["overhead_pct"] = 100.0 * (result["time_ratio"] - 1.0)  # how much longer per image, in percent
    result["cpu_time_ratio"] = result["method_cpu_s"] / result["plain_cpu_s"]  # same images per epoch
    result["test_images_per_s"] = args.epochs * raw["test_tiles"] / raw["test_s"]
    result["test_bags_per_s"] = args.epochs * raw["test_bags"] / raw["test_s"]

    settings = (f"settings: {arch} | image {image_size} px (tiles {raw['tile_size']} px) | batch {batch_size} | "
                f"workers {args.num_workers} | {raw['train_tiles']} train tiles | {raw['test_tiles']} test tiles "
                f"({raw['test_bags']} bags) | {raw['precision']}, channels-last {'on' if raw['channels_last'] else 'off'} "
                f"{', torch.compile' if raw['compile'] else ''} (both paths) | 1 warm-up + {args.epochs} timed epochs per path | seed {args.seed}")
    print_table(environment_line(device), settings, result)
    return result


if __name__ == "__main__":
    main()
