"""Peak memory of dense picking on one large micrograph, untiled and in tiles (pick_particles.py --tile-size).

    python benchmarks/picking_memory.py                          # 4096 x 4096, downsampling 1, tiles 0 / 3072 / 2048
    python benchmarks/picking_memory.py --size 2048 --tile-sizes 0 1024

Each setting runs in its own Python process (peak RSS is a per-process high-water mark): build
the classifier (``--backbone``, a ``--window`` px window with ``--context`` px of context, random
weights: memory does not depend on them), generate a ``--size`` x ``--size`` micrograph, then call
:func:`utils.picking.picker.pick_micrograph` (what pick_particles.py runs per micrograph: the
dense map in tiles of at most ``--tile-size`` px, NMS, refinement) once. The process reports its
resident set size before picking and its peak (``ru_maxrss``) after; the difference is what
picking costs. Prints one table and returns the numbers; nothing about memory is asserted.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from models.fixmatch_pu import FixMatchPUModel
from utils.errors import UserError, exit_on_user_error
from utils.picking.picker import DEFAULT_TILE, PickSettings, pick_micrograph

MIB = 1024 * 1024


def build_parser():
    p = argparse.ArgumentParser(description="Peak resident memory of dense picking on one micrograph, per tile size.")
    p.add_argument("--size", type=int, default=4096, help="side of the square micrograph, px (default: %(default)s)")
    p.add_argument("--tile-sizes", type=int, nargs="+", default=[0, DEFAULT_TILE, 2048],
                   help=f"tile sizes to measure, px; 0 = untiled (default: 0 {DEFAULT_TILE} 2048)")
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50"],
                   help="ResNet trunk (default: %(default)s)")
    p.add_argument("--window", type=int, default=64, help="classified window, px (default: %(default)s)")
    p.add_argument("--context", type=int, default=64, help="context on each side, px (default: %(default)s)")
    p.add_argument("--stride", type=int, default=32, help="map stride, px (default: %(default)s)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one measurement, in this process
    return p


def _rss_mib():
    """Current resident set size of this process (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(args, tile_size):
    """One picking call in this process: ``{"rss_before_mib", "peak_rss_mib", "seconds", "n_candidates"}``."""
    torch.manual_seed(0)
    model = FixMatchPUModel(args.backbone, context=args.context).eval()
    array = np.random.default_rng(0).normal(size=(args.size, args.size)).astype(np.float32)
    settings = PickSettings(threshold=0.5, min_distance=float(args.window // 2), downsample=1.0,
                            normalization="zscore", patch_size=args.window + 2 * args.context, stride=args.stride,
                            max_tile=tile_size or None)
    before = _rss_mib()
    t0 = time.perf_counter()
    candidates, _, _ = pick_micrograph(model, array, settings, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"tile_size": tile_size, "rss_before_mib": before, "peak_rss_mib": peak, "picking_mib": peak - before,
            "seconds": seconds, "n_candidates": len(candidates)}


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args, args.child)))
        return None
    if args.size < args.window + 2 * args.context or min(args.tile_sizes) < 0:
        raise UserError(f"--size {args.size} / --tile-sizes {args.tile_sizes}: expected a micrograph at least one "
                        f"patch wide and tile sizes >= 0")
    rows = []
    base = [sys.executable, str(Path(__file__).resolve()), "--size", str(args.size), "--backbone", args.backbone,
            "--window", str(args.window), "--context", str(args.context), "--stride", str(args.stride)]
    for tile in args.tile_sizes:
        done = subprocess.run(base + ["--child", str(tile)], capture_output=True, text=True)
        if done.returncode:
            raise UserError(f"--tile-sizes {tile}: the measurement failed: {done.stderr.strip().splitlines()[-1]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | {args.backbone}, {args.window} px window + "
          f"{args.context} px context | {args.size}x{args.size} micrograph, downsampling 1, stride {args.stride}")
    print(f"{'tile size':>10} {'RSS before (MiB)':>17} {'peak RSS (MiB)':>15} {'picking (MiB)':>14} {'seconds':>8}")
    for r in rows:
        print(f"{r['tile_size'] or 'untiled':>10} {r['rss_before_mib']:>17.0f} {r['peak_rss_mib']:>15.0f} "
              f"{r['picking_mib']:>14.0f} {r['seconds']:>8.1f}")
    counts = {r["n_candidates"] for r in rows}
    print(f"candidates: {', '.join(str(r['n_candidates']) for r in rows)} (equal maps give equal candidates)")
    return {"size": args.size, "rows": rows, "same_candidates": len(counts) == 1}


if __name__ == "__main__":
    main()
