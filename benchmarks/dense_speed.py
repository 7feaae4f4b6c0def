"""Time of the dense map per micrograph: the dilated trunk against shift-and-stitch, per map stride.

    python benchmarks/dense_speed.py                     # a 4096 x 4096 micrograph, downsampling 2
    python benchmarks/dense_speed.py --micrograph ../shared/data/empiar10017_sample/micrographs/Falcon_2012_06_12-15_07_41_0.jpg

Picks one micrograph (``--micrograph``, else a generated one of ``--size`` px) with
:func:`utils.picking.picker.pick_micrograph`, what pick_particles.py runs per micrograph (the dense
map in tiles of at most 3072 px, NMS, refinement), with a ResNet-18 classifying ``--window`` px
windows with ``--context`` px of context (random weights: the time does not depend on them), for
each map stride with the trunk dilated (``layer4`` at stride 1, :func:`models.dense.dilated_trunk`) and
without (shift-and-stitch of the plain trunk), and with the 8-fold test-time augmentation when
``--tta`` is given. Prints one table (the median of ``--repeats`` runs) and returns the numbers.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from datasets.micrographs import read_micrograph
from models.fixmatch_pu import FixMatchPUModel
from utils.errors import UserError, exit_on_user_error
from utils.picking.picker import PickSettings, pick_micrograph


def build_parser():
    p = argparse.ArgumentParser(description="Dense map time per micrograph: dilated trunk vs shift-and-stitch.")
    p.add_argument("--micrograph", default=None, help="a micrograph file (default: a generated one of --size px)")
    p.add_argument("--size", type=int, default=4096, help="side of the generated micrograph, px (default: %(default)s)")
    p.add_argument("--downsample", type=float, default=2.0, help="downsampling factor (default: %(default)s)")
    p.add_argument("--window", type=int, default=64, help="classified window, px (default: %(default)s)")
    p.add_argument("--context", type=int, default=64, help="context around it, px (default: %(default)s)")
    p.add_argument("--strides", type=int, nargs="+", default=[8, 16, 32], help="map strides (default: 8 16 32)")
    p.add_argument("--tta", action="store_true", help="also time the 8-fold test-time augmentation (dilated)")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting, the median is reported (default: 1)")
    return p


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.micrograph:
        array = read_micrograph(args.micrograph)
    else:
        if args.size < 256:
            raise UserError(f"--size {args.size}: expected at least 256 px")
        array = np.random.default_rng(0).normal(size=(args.size, args.size)).astype(np.float32)
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=args.context).eval()
    patch = args.window + 2 * args.context
    settings = [(s, d, False) for s in args.strides for d in ((True, False) if s < 32 else (False,))]
    settings += [(s, True, True) for s in args.strides if args.tta]
    rows = []
    for stride, dilate, tta in settings:
        cfg = PickSettings(threshold=0.5, min_distance=54.0, downsample=args.downsample, normalization="zscore",
                           patch_size=patch, stride=stride, tta=tta, dilate=dilate)
        times, maps = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            _, _, timing = pick_micrograph(model, array, cfg, torch.device("cpu"))
            times.append(time.perf_counter() - t0)
            maps.append(timing["map_s"])
        rows.append({"stride": stride, "dilated": dilate and stride < 32, "tta": tta, "seconds": statistics.median(times),
                     "map_s": statistics.median(maps)})
        print(rows[-1], file=sys.stderr, flush=True)
    h, w = array.shape
    print(f"{w} x {h} micrograph, downsampling {args.downsample:g}, ResNet-18, {args.window} px window + "
          f"{args.context} px context, {torch.get_num_threads()} threads")
    print("| stride | trunk | TTA | picking (s) | of it the map (s) |\n|---|---|---|---|---|")
    for r in rows:
        trunk = "dilated layer4, one pass" if r["dilated"] else "plain, shift-and-stitch"
        print(f"| {r['stride']} | {trunk} | {'8x' if r['tta'] else 'off'} | {r['seconds']:.2f} | {r['map_s']:.2f} |")
    return {"rows": rows, "shape": [h, w], "threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
