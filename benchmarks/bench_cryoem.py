"""CryoEM speed benchmark: training patches/s and picking micrographs/s, in one run, on one table.

    python benchmarks/bench_cryoem.py                      # CPU: 64 px windows (192 px patches), 1024 x 1024 micrograph
    python benchmarks/bench_cryoem.py --device cuda        # GPU: 128 px windows (256 px patches), 4096 x 4096 micrograph

Everything is measured in the same process on the same generated data, model (``--backbone``,
``--context``) and batch size, and both training steps take the trainer's fast path
(``--amp``: bf16 autocast, or fp16 + GradScaler, on a GPU; ``--channels-last``; cuDNN
autotuning; no-ops on the CPU, where the trainer runs in float32). Picking runs in float32, as
``pick_particles.py`` does:

* Training. The selective FixMatch step is :func:`utils.cryoem.epoch.train_one_epoch`, the
  trainer's own epoch function (weak + strong augmentation on the device, EMA-teacher forward
  on the weak unlabelled views, one student forward of both views, nnPU + consistency +
  entropy objective, clipping, Adam, cosine step, EMA update), driven by the trainer's
  :class:`datasets.cryoem_dataset_pu.PUBatchSampler` (1:4 positive:unlabelled). The plain
  supervised step is one forward / BCE / backward / Adam step of the same model on the same
  batches (no teacher, no augmentation, no clipping). Both start from the same weights and
  read the same DataLoader, so the ratio is the price of the method (expected ~2-3x: a
  teacher forward plus a student forward/backward of about 1.8 batches).
* Picking at map stride 32 with the trained student (eval mode):
  - ``dense``: :func:`utils.picking.picker.pick_micrograph` with the picker's defaults: the
    dense map (:func:`models.dense.probability_map` mode ``"dense"``: one trunk pass over the
    micrograph, window-pooled head) in tiles of at most ``--tile-size`` px, then one greedy NMS
    and the sub-cell refinement of every candidate (what ``pick_particles.py`` runs per micrograph);
  - ``crops``: the same function in mode ``"crops"`` (every patch cut out and classified,
    batched one map row at a time): the repository's reference;
  - ``crop loop``: a plain Python loop over the crops, ``--loop-batch`` at a time (default 1),
    each batch's probabilities read back to the host, as research code does. It is timed on the
    top-left ``--loop-size`` square of the micrograph only; its rate per map cell is scaled to
    the full micrograph (labelled "scaled" in the table).
  ``max |p_dense - p_crops|`` is over all map cells. "Equal picks": peaks of both maps with
  :func:`utils.picking.peaks.find_peaks` at one threshold (the crop map's value that leaves as many
  cells above it as there are particles) and a 3 x 3 cell neighbourhood, then matched one to
  one (:func:`utils.picking.matching.match_picks`) within 1.5 cells (a neighbouring cell, diagonals
  included). The two maps differ where a crop's trunk sees zero padding and the dense trunk
  real neighbours (models/dense.py); with the default 64 px of context (two cells of the last
  feature map) a trained model's maps agree closely (EMPIAR-10017, ``--checkpoint``: mean
  difference 0.006, correlation 0.99, 96% of the picks coincide), while the few steps trained
  here leave a model whose agreement means little. The agreement is reported, not assumed;
  the speed numbers do not depend on it.

Timing: warm-up iterations (``--warmup`` training steps per method, one picking call per mode)
are excluded; on CUDA the clock is read after ``torch.cuda.synchronize``. The data is one
micrograph from the demo's and the tests' generator,
:func:`datasets.synthetic_micrographs.synthetic_micrograph` (dark, bright-cored particles of
radius window / 6 at random places at least a diameter apart, decoy streaks, a smooth
background, noise; 0.7 particles per (max(window, 4 x radius))^2 px, a third as many decoys),
z-scored by :func:`datasets.cryoem_preprocess.prepare_micrograph` as ``preprocess_cryoem.py``
and ``pick_particles.py`` prepare a micrograph. Training positives are patches centred on the
particles, unlabelled ones patches at random places.

Prints the environment (torch, device, threads) and one table to stdout; ``main()`` returns the
numbers as a dict. Nothing here is asserted about speed: the "target" note only says whether
the project's target, dense picking at least 20x faster than the crop loop (``SPEEDUP_TARGET``),
is met on this machine.
"""
import argparse
import copy
import functools
import itertools
import math
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import add_fast_path_flags
from datasets.cryoem_dataset_pu import PUBatchSampler
from datasets.cryoem_preprocess import crops_at, prepare_micrograph
from datasets.micrographs import read_micrograph
from datasets.synthetic_micrographs import synthetic_micrograph
from models.dense import TRUNK_STRIDE, map_shape, probability_map, tile_spans, trunk_reach
from models.fixmatch_pu import EMATeacher, FixMatchPUModel
from utils.cryoem.config import default_config
from utils.cryoem.epoch import EpochSetup, StepParams, train_one_epoch
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error
from utils.picking.matching import match_picks
from utils.picking.peaks import find_peaks
from utils.picking.picker import DEFAULT_TILE, PickSettings, load_picker, pick_micrograph
from utils.precision import configure_backends, make_precision, memory_format
from utils.seed import seed_everything

STRIDE = 32               # picking map stride (px), the picker's default
SPEEDUP_TARGET = 20.0     # target: dense picking at least 20x faster than the crop loop
MATCH_RADIUS_CELLS = 1.5  # a pick "coincides" with one in a neighbouring map cell, diagonals included
# device-dependent defaults (CPU: finishes in about two minutes on 2 cores; CUDA: 128 px windows, a 4096 px micrograph)
# patch_size: the classified window; without --patch-size the input is that window + 2 x --context
CPU_DEFAULTS = {"patch_size": 64, "micrograph_size": 1024, "steps": 20, "loop_size": 512, "repeats": 3}
CUDA_DEFAULTS = {"patch_size": 128, "micrograph_size": 4096, "steps": 50, "loop_size": 1024, "repeats": 5}


def build_parser():
    p = argparse.ArgumentParser(
        description="Time the CryoEM selective FixMatch training step against a plain supervised step, and "
                    "dense picking against crop-by-crop picking, on the same generated data; print one table. "
                    f"The table says whether dense picking meets the target of being at least "
                    f"{SPEEDUP_TARGET:g}x faster than the crop loop (reported, not asserted).")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto, CUDA when available)")
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50"],
                   help="ResNet trunk of the classifier (default: resnet18)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="classifier input in px, context included; a multiple of 32 for dense picking "
                        "(default: a 64 px window on CPU, 128 on CUDA, plus the context on each side: 192 and "
                        "256 px)")
    p.add_argument("--context", type=int, default=64,
                   help="px of surroundings on each side of the classified window, a multiple of 32 "
                        "(FixMatchPUModel's context; default: %(default)s, as preprocess_cryoem.py)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="training batch size, the same for both steps (default: 32, the trainer's default)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per method, after the warm-up (default: 20 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed training steps per method first; >= 2 lets cuDNN see both batch shapes the "
                        "1:4 sampler makes (default: 3)")
    p.add_argument("--rounds", type=int, default=2,
                   help="the timed steps are split into this many rounds, the two methods taking turns, so a "
                        "change of load on a shared machine hits both alike (default: 2)")
    p.add_argument("--micrograph-size", type=int, default=None,
                   help="side of the square micrograph picked by the dense and crop paths, in px "
                        "(default: 1024 on CPU, 4096 on CUDA)")
    p.add_argument("--loop-size", type=int, default=None,
                   help="side of the top-left square the crop loop is timed on; its per-cell rate is scaled to "
                        "--micrograph-size (default: 512 on CPU, 1024 on CUDA; at most --micrograph-size)")
    p.add_argument("--loop-batch", type=int, default=1,
                   help="crops per forward pass in the crop loop (default: 1, one crop at a time)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed picking calls per mode after one warm-up call; the crop loop runs once "
                        "(default: 3 on CPU, 5 on CUDA)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 keeps torch's setting, e.g. from OMP_NUM_THREADS (default: 0)")
    add_fast_path_flags(p, "the trainer", "training.amp", "training.channels_last",
                        "the data, the weights and the augmentations")
    p.add_argument("--checkpoint", default=None,
                   help="picking with this trained best_model.pt (its patch size and context) instead of the "
                        "briefly trained student (default: none)")
    p.add_argument("--micrograph", default=None,
                   help="with --checkpoint: pick on this micrograph, prepared like the checkpoint's training data "
                        "(default: the generated one)")
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE,
                   help="dense picking's largest tile side in px, as pick_particles.py --tile-size; 0 = untiled "
                        "(default: %(default)s, the picker's default)")
    p.add_argument("--n-particles", type=int, default=600,
                   help="with --micrograph: about how many particles it holds; sets the pick threshold of the "
                        "dense-vs-crops comparison (default: %(default)s)")
    return p


# ------------------------------------------------------------------------------- helpers

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """``(seconds, fn())`` with the device's queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _pu_counts(steps, batch_size, ratio):
    """Unlabelled patches for which a PUBatchSampler epoch is exactly ``steps`` batches."""
    p, u = ratio
    return steps * batch_size - (steps * batch_size * p) // (p + u)


def make_training_set(image, centres, patch_size, batch_size, steps, ratio, seed, generator):
    """``(TensorDataset(x, is_positive, index), PUBatchSampler)`` of patches cut from ``image``.

    Positives are centred on the particles (+- 2 px); unlabelled ones are centred anywhere.
    The sampler gives exactly ``steps`` batches of ``batch_size`` with the ``ratio`` p:u.
    """
    size = image.shape[0]
    n_unl = _pu_counts(steps, batch_size, ratio)
    pos_centres = centres + torch.randint(-2, 3, centres.shape, generator=generator, device=centres.device)
    unl_centres = torch.randint(0, size, (n_unl, 2), generator=generator, device=centres.device)
    all_centres = torch.cat([pos_centres.clamp(0, size - 1), unl_centres]).cpu().numpy()
    x = crops_at(image, all_centres, patch_size)[:, None].float().cpu()  # [N, 1, P, P], on the host as data on disk
    n_pos = len(centres)
    index = torch.arange(len(x))
    dataset = torch.utils.data.TensorDataset(x, index < n_pos, index)
    sampler = PUBatchSampler(n_pos, n_unl, batch_size, ratio=ratio, seed=seed)
    if len(sampler) != steps:  # the arithmetic above mirrors the sampler's epoch length
        raise RuntimeError(f"PUBatchSampler gives {len(sampler)} batches, expected {steps}")
    return dataset, sampler


def _round_sizes(steps, rounds):
    """``steps`` split into at most ``rounds`` near-equal positive parts, largest first."""
    rounds = max(1, min(rounds, steps))
    return [steps // rounds + (i < steps % rounds) for i in range(rounds)]


def _correlation(a, b):
    """Pearson correlation of two maps (NaN when one is constant)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else float("nan")


def supervised_epoch(model, batches, optimizer, device, precision, memory_format=torch.contiguous_format):
    """The plain supervised step on every batch: forward, BCE on the 0/1 labels, backward, Adam,
    with the trainer's precision (autocast forward, float32 loss, GradScaler for float16) and memory format."""
    model.train()
    scaler = precision.scaler
    for x, labels, _ in batches:
        x = x.to(device, non_blocking=True).float().contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True).float()
        with precision.autocast():
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


@torch.inference_mode()
def crop_loop_map(model, image, patch_size, stride, batch_size):
    """Probability map ``[ceil(h/s), ceil(w/s)]`` (numpy) by a Python loop over crops, ``batch_size`` at a time.

    The crop-by-crop picking of research code: slice each patch out of the zero-padded image
    (the frame of models/dense.py: cell ``(a, b)`` is the patch centred on pixel ``(a*s, b*s)``),
    classify the batch, read the probabilities back, write them into the map.
    """
    was_training = model.training
    model.eval()
    h, w = image.shape
    na, nb = map_shape(h, w, stride)
    half = patch_size // 2
    bottom = max(0, (na - 1) * stride + patch_size - half - h)
    right = max(0, (nb - 1) * stride + patch_size - half - w)
    padded = F.pad(image[None, None].float(), (half, right, half, bottom))
    out = np.empty((na, nb), dtype=np.float32)
    cells = list(itertools.product(range(na), range(nb)))
    try:
        for i in range(0, len(cells), batch_size):
            chunk = cells[i:i + batch_size]
            x = torch.cat([padded[:, :, a * stride:a * stride + patch_size, b * stride:b * stride + patch_size]
                           for a, b in chunk])
            probs = torch.sigmoid(model(x).float()).cpu().numpy()
            for (a, b), p in zip(chunk, probs):
                out[a, b] = p
    finally:
        model.train(was_training)
    return out


def pick_agreement(dense_map, crop_map, n_particles):
    """Peaks of both maps at one threshold and how many coincide (see the module docstring)."""
    crop_np = crop_map.cpu().numpy().astype(np.float64)
    k = min(max(1, n_particles), crop_np.size)
    threshold = float(np.sort(crop_np, axis=None)[-k])  # k cells of the reference map are >= it
    # min_distance 1 cell: a peak is the maximum of its 3 x 3 cells, no two picks in neighbouring cells
    xy_c, s_c = find_peaks(crop_np, threshold, min_distance=1.0)
    xy_d, s_d = find_peaks(dense_map.cpu().numpy(), threshold, min_distance=1.0)
    _, is_match = match_picks(xy_d, s_d, xy_c, MATCH_RADIUS_CELLS)
    matched = int(is_match.sum())
    most = max(len(xy_c), len(xy_d))
    return {"pick_threshold": threshold, "picks_crops": int(len(xy_c)), "picks_dense": int(len(xy_d)),
            "picks_matched": matched, "pick_agreement": matched / most if most else float("nan")}


def _defaults(args, device):
    """The flags left at None resolved for the device (CPU or CUDA defaults), checked."""
    table = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in table.items()}
    if args.patch_size is None:
        s["patch_size"] += 2 * args.context
    if s["loop_size"] > s["micrograph_size"]:
        if args.loop_size is not None:
            raise UserError(f"--loop-size {s['loop_size']} is larger than --micrograph-size {s['micrograph_size']}")
        s["loop_size"] = s["micrograph_size"]
    ps, ctx = s["patch_size"], args.context
    if ps < TRUNK_STRIDE or ps % TRUNK_STRIDE:
        raise UserError(f"--patch-size is {ps}, expected a multiple of {TRUNK_STRIDE} (dense picking needs it)")
    if ctx < 0 or ctx % TRUNK_STRIDE or ps - 2 * ctx < TRUNK_STRIDE:
        raise UserError(f"--context is {ctx}, expected a multiple of {TRUNK_STRIDE} with --patch-size - 2 x context "
                        f">= {TRUNK_STRIDE} (patch size {ps})")
    for name, low in (("micrograph_size", ps), ("loop_size", STRIDE), ("steps", 1), ("repeats", 1)):
        if s[name] < low:
            raise UserError(f"--{name.replace('_', '-')} is {s[name]}, expected >= {low}")
    for name in ("warmup", "rounds", "loop_batch", "batch_size"):
        value, low = getattr(args, name), 0 if name == "warmup" else 1
        if value < low:
            raise UserError(f"--{name.replace('_', '-')} is {value}, expected >= {low}")
    return s


def environment(device):
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    line = (f"torch {torch.__version__} | python {platform.python_version()} | device {device}{gpu} | "
            f"threads {torch.get_num_threads()}")
    if device.type == "cuda":
        line += (f" | cudnn.benchmark {torch.backends.cudnn.benchmark} | "
                 f"tf32 conv {torch.backends.cudnn.allow_tf32} matmul {torch.backends.cuda.matmul.allow_tf32}")
    return line


def _fmt(value, digits=3):
    if isinstance(value, int):
        return str(value)
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1e-2 and value else f"{value:,.{digits}f}".rstrip("0").rstrip(".")


def print_table(rows):
    head = ("measurement", "value", "note")
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(3)]
    for r in (head, tuple("-" * w for w in widths), *rows):
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}".rstrip())


# ------------------------------------------------------------------------------------ main

def main(argv=None):
    """Run the benchmark; return the settings and numbers as a dict (see the table for their meaning)."""
    return exit_on_user_error(_main)(argv)


def _main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    s = _defaults(args, device)
    ps, size, loop_size, bs, steps = s["patch_size"], s["micrograph_size"], s["loop_size"], args.batch_size, s["steps"]
    seed_everything(args.seed)
    t_start = time.perf_counter()
    env = environment(device)
    print(env, flush=True)
    print(f"{args.backbone}, patch {ps} px (context {args.context}), batch {bs}, {steps} timed + {args.warmup} "
          f"warm-up steps | picking {size}x{size} at stride {STRIDE}, crop loop on {loop_size}x{loop_size} "
          f"in batches of {args.loop_batch}, {s['repeats']} timed calls | seed {args.seed}", flush=True)
    # the trainer's fast path (train_pu_selective_fixmatch.py), the same for both training steps
    precision, fmt = make_precision(device, args.amp), memory_format(device, args.channels_last)
    configure_backends(device)
    print(f"training precision {precision.describe()}, channels-last {'on' if fmt == torch.channels_last else 'off'} "
          f"(both steps); picking in float32 as pick_particles.py", flush=True)

    # ---- data: one micrograph from the demo's generator, prepared as the pipeline does; training patches are cut from it
    cfg = default_config()
    ratio = tuple(int(v) for v in cfg["data"]["batch_ratio"])
    gen = torch.Generator(device=device).manual_seed(args.seed)
    window = ps - 2 * args.context  # the classified window
    radius = max(2, window // 6)
    n_mic = max(1, round(0.7 * (size / max(window, 4 * radius)) ** 2))
    array, xy = synthetic_micrograph(size, radius, n_mic, n_mic // 3, seed=args.seed, local=True)
    image = prepare_micrograph(array, 1.0, "zscore", device=device)[0]
    centres = torch.as_tensor(xy[:, ::-1].copy(), dtype=torch.long, device=device)  # (x, y) -> (row, col)
    epoch_steps = max(_round_sizes(steps, args.rounds)[0], args.warmup)  # batches per pass of the loader
    dataset, sampler = make_training_set(image, centres, ps, bs, epoch_steps, ratio, args.seed, gen)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0,
                                         pin_memory=device.type == "cuda")

    # ---- training: the same initial weights for both methods
    model0 = FixMatchPUModel(args.backbone, dropout=cfg["model"]["dropout"], context=args.context).to(
        device, memory_format=fmt)
    tr = cfg["training"]
    fused = {"fused": True}  # as the trainer: one kernel over all parameters, CPU and CUDA

    def adam(model):
        return torch.optim.Adam(model.parameters(), lr=tr["learning_rate"], weight_decay=tr["weight_decay"], **fused)

    supervised = copy.deepcopy(model0)
    sup_opt = adam(supervised)
    student = copy.deepcopy(model0)
    teacher = EMATeacher(student, decay=cfg["model"]["ema_decay"], enabled=cfg["model"]["use_ema"])
    fm_opt = adam(student)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(fm_opt, T_max=steps + args.warmup, eta_min=tr["min_lr"])
    params = StepParams.from_config(cfg, 0.3)  # class prior 0.3, as the demo data (the work per step does not depend on it)
    # an epoch past every ramp: all loss terms at full weight (the work per step is the same at any epoch)
    epoch_index = max(params.rampup_epochs, params.entropy_start_epoch + params.entropy_rampup_epochs)
    aug = torch.Generator(device=device).manual_seed(args.seed + 1)

    def run_supervised(n):
        supervised_epoch(supervised, itertools.islice(loader, n), sup_opt, device, precision, fmt)

    def run_fixmatch(n, desc="FixMatch"):
        setup = EpochSetup(student, teacher, itertools.islice(loader, n), fm_opt, scheduler, params, device,
                           precision=precision, memory_format=fmt)
        return train_one_epoch(setup, epoch_index + 1, desc=desc, generator=aug)

    if args.warmup:
        run_supervised(args.warmup)
        run_fixmatch(args.warmup, desc="warm-up")
    # the two methods take turns, so that a change of load on a shared machine hits both alike
    sup_s = fm_s = 0.0
    for r, n in enumerate(_round_sizes(steps, args.rounds)):
        sampler.set_epoch(r)
        sup_s += timed(functools.partial(run_supervised, n), device)[0]
        fm_s += timed(functools.partial(run_fixmatch, n), device)[0]
    n_train = steps * bs
    sup_rate, fm_rate = n_train / sup_s, n_train / fm_s
    del supervised, sup_opt

    # ---- picking with the trained student, or a given checkpoint (on a given micrograph)
    model = student.eval()
    n_particles = len(centres)
    if args.checkpoint:
        model, ckpt = load_picker(args.checkpoint, device)
        ps = int(ckpt["patch_size"])
        if args.micrograph:
            meta = ckpt.get("data_metadata") or {}
            image, _ = prepare_micrograph(read_micrograph(args.micrograph), meta.get("downsample", 1.0),
                                          meta.get("normalization", "zscore"), device=device)
            n_particles = args.n_particles
        print(f"picking with {args.checkpoint} (patch {ps} px, context {ckpt.get('context', 0)})"
              + (f" on {args.micrograph}, {image.shape[1]}x{image.shape[0]} after downsampling" if args.micrograph
                 else ""), flush=True)
    size = image.shape[0]
    loop_size = min(loop_size, size)
    na, nb = map_shape(*image.shape, STRIDE)

    # dense: the picker's own per-micrograph function on the prepared image (downsampling 1, no
    # normalisation: the image already is the network's input), tiles and refinement on
    settings = PickSettings(threshold=0.0, min_distance=float(max(radius, STRIDE)), downsample=1.0,
                            normalization="none", patch_size=ps, stride=STRIDE, mode="dense", refine=True,
                            max_tile=args.tile_size or None)
    array = image.cpu().numpy()
    runs = {"dense": lambda: pick_micrograph(model, array, settings, device)[1],
            "crops": lambda: probability_map(model, image, ps, STRIDE, "crops")}
    maps, seconds = {}, {"dense": [], "crops": []}
    for mode in seconds:  # warm-up calls
        runs[mode]()
    for _ in range(s["repeats"]):  # alternating, as the training steps
        for mode in seconds:
            t, maps[mode] = timed(runs[mode], device)
            seconds[mode].append(t)
    dense_s, crops_s = (float(np.median(seconds[mode])) for mode in ("dense", "crops"))
    dense_map, crop_map = maps["dense"].to(image.device), maps["crops"]
    padded = ((na - 1) * STRIDE + ps + TRUNK_STRIDE, (nb - 1) * STRIDE + ps + TRUNK_STRIDE)  # as models.dense pads
    tiles = [len(tile_spans(n, length, ps, getattr(model, "context", 0), settings.max_tile, trunk_reach(model.trunk)))
             for n, length in zip((na, nb), padded)]
    diff = (dense_map - crop_map).abs()
    agreement = pick_agreement(dense_map, crop_map, n_particles)

    small = image[:loop_size, :loop_size]
    crop_loop_map(model, small[:STRIDE, :STRIDE * 2], ps, STRIDE, args.loop_batch)  # warm-up: a few crops
    loop_s, loop_map = timed(functools.partial(crop_loop_map, model, small, ps, STRIDE, args.loop_batch), device)
    loop_ref = probability_map(model, small, ps, STRIDE, "crops").cpu().numpy()
    loop_check = float(np.abs(loop_map - loop_ref).max())
    loop_cells = loop_map.size
    loop_s_full = loop_s * (na * nb) / loop_cells  # the loop's time per cell, over the full micrograph

    out = {
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
        "backbone": args.backbone, "patch_size": ps, "context": getattr(model, "context", args.context),
        "batch_size": bs, "steps": steps,
        "warmup": args.warmup, "micrograph_size": size, "loop_size": loop_size, "loop_batch": args.loop_batch,
        "stride": STRIDE, "repeats": s["repeats"], "seed": args.seed, "tile_size": args.tile_size,
        "tiles": tiles,
        "supervised_patches_per_s": sup_rate, "fixmatch_patches_per_s": fm_rate,
        "fixmatch_cost_ratio": sup_rate / fm_rate,
        "dense_micrographs_per_s": 1.0 / dense_s, "crops_micrographs_per_s": 1.0 / crops_s,
        "loop_micrographs_per_s": 1.0 / loop_s_full,
        "dense_vs_crops_speedup": crops_s / dense_s, "dense_vs_loop_speedup": loop_s_full / dense_s,
        "crops_vs_loop_speedup": loop_s_full / crops_s,
        "max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean()),
        "map_correlation": _correlation(dense_map, crop_map),
        **agreement,
        "loop_check_max_abs_diff": loop_check,
        "seconds": time.perf_counter() - t_start,
    }

    def met(speedup):
        return f"target >= {SPEEDUP_TARGET:g}x: {'met' if speedup >= SPEEDUP_TARGET else 'NOT met'}"

    mp = f"{image.shape[1]}x{image.shape[0]}"
    print()
    print_table([
        ("train: supervised step (patches/s)", _fmt(sup_rate, 1), f"BCE + Adam, {steps} steps of {bs}"),
        ("train: selective FixMatch step (patches/s)", _fmt(fm_rate, 1), "utils.cryoem.epoch.train_one_epoch"),
        ("train: FixMatch cost = supervised / FixMatch", _fmt(out["fixmatch_cost_ratio"], 2) + "x",
         "expected ~2-3x"),
        (f"pick: dense (micrographs/s, {mp})", _fmt(out["dense_micrographs_per_s"]),
         f"utils.picking.picker.pick_micrograph: map in {tiles[0]}x{tiles[1]} tile(s) of <= "
         f"{settings.max_tile or 'any'} px, NMS, refinement"),
        (f"pick: crops, batched per map row (micrographs/s, {mp})", _fmt(out["crops_micrographs_per_s"]),
         "models.dense mode 'crops'"),
        (f"pick: crop loop, {args.loop_batch} crop(s)/pass (micrographs/s, {mp})",
         _fmt(out["loop_micrographs_per_s"]),
         f"timed on {loop_size}x{loop_size} ({loop_cells} crops), scaled per cell"),
        ("pick: speedup dense / crop loop", _fmt(out["dense_vs_loop_speedup"], 1) + "x",
         met(out["dense_vs_loop_speedup"])),
        ("pick: speedup dense / crops batched per row", _fmt(out["dense_vs_crops_speedup"], 1) + "x",
         met(out["dense_vs_crops_speedup"])),
        ("pick: max |p_dense - p_crops|", _fmt(out["max_abs_prob_diff"]),
         f"mean {_fmt(out['mean_abs_prob_diff'])}, correlation {_fmt(out['map_correlation'], 2)} over "
         f"{na}x{nb} cells"),
        ("pick: picks dense / crops / coinciding", f"{agreement['picks_dense']} / {agreement['picks_crops']} / "
         f"{agreement['picks_matched']}", f"threshold {_fmt(agreement['pick_threshold'])}, within "
         f"{MATCH_RADIUS_CELLS:g} cells; agreement {_fmt(agreement['pick_agreement'], 2)}"),
        ("pick: max |p_loop - p_crops| (loop check)", _fmt(loop_check), "same crops, should be ~0"),
    ])
    print(f"\ntotal {out['seconds']:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
