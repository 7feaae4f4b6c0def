"""Write small synthetic demo datasets so the training scripts run without private data.

    python make_demo_data.py                  # every family below, under ./data
    python make_demo_data.py --family ana --out /tmp/ana --nTrain 16 --tileSize 128

Families and where they go (where the configs look by default):
  ana         <out>/images/*.png + <out>/annotations.csv   (config.py, multi-label)
  ana_single  <out>/ana_single/...                          (config_single.py, one label each)
  cryoem      <out>/cryoem/preprocessed_data.pt              (configs/pu_selective_fixmatch.yaml)
  micrographs <out>/micrographs/micrographs/*.{mrc,png,tif} + coordinates.star/.csv
              (whole generated micrographs for preprocess_cryoem.py -> pick_particles.py)
A marker file (``.ana_demo``, ``.cryoem_demo``, ``.micrographs_demo``) in each folder records the generator
arguments: a second run with the same arguments returns at once, and foreign data (no marker)
is never overwritten without ``--force``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets.synthetic_ana import generate_ana_demo
from datasets.synthetic_cryoem import generate_cryoem_demo
from datasets.synthetic_micrographs import generate_micrograph_demo
from utils.errors import UserError, exit_on_user_error

MARKER_FORMAT = 1  # bump when the generator's output changes, so old demos get rebuilt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["ana", "ana_single", "cryoem", "micrographs", "all"], default="all",
                   help="which demo dataset(s) to write (default: all)")
    p.add_argument("--out", default="./data", help="output directory (default: ./data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--nTrain", type=int, default=40, help="train images (default: 40)")
    p.add_argument("--nVal", type=int, default=12, help="val images (default: 12)")
    p.add_argument("--nTest", type=int, default=12, help="test images (default: 12)")
    p.add_argument("--tileSize", type=int, default=448,
                   help="tile side in px; the paper tiles at 448 (default: 448)")
    p.add_argument("--tilesX", type=int, default=2, help="tiles per image row (default: 2)")
    p.add_argument("--tilesY", type=int, default=2, help="tiles per image column (default: 2)")
    p.add_argument("--nPositive", type=int, default=200, help="cryoem: labelled positive patches (default: 200)")
    p.add_argument("--nUnlabeled", type=int, default=1000,
                   help="cryoem: unlabelled patches, particles at the prior rate (default: 1000)")
    p.add_argument("--nEval", type=int, default=200, help="cryoem: labelled val and test patches, each (default: 200)")
    p.add_argument("--nMicrographs", type=int, default=4,
                   help="micrographs: how many (the demo trains on all but the last) (default: 4)")
    p.add_argument("--micrographSize", type=int, default=384, help="micrographs: side in px (default: 384)")
    p.add_argument("--patchSize", type=int, default=64, help="cryoem: patch side in px (default: 64)")
    p.add_argument("--prior", type=float, default=0.3,
                   help="cryoem: fraction of particles among the unlabelled patches (default: 0.3)")
    p.add_argument("--chunkSize", type=int, default=None,
                   help="cryoem: write chunk_*.pt files of at most this many patches (default: one file)")
    p.add_argument("--force", action="store_true",
                   help="regenerate even if the data exist or were not written by this script")
    return p


def _make_ana(args: argparse.Namespace, out: Path | None = None, max_labels: int | None = None,
              title: str = "ANA") -> Path:
    """ANA demo: <out>/images/, <out>/annotations.csv and the marker <out>/.ana_demo."""
    out = Path(args.out) if out is None else out
    csv_path, marker = out / "annotations.csv", out / ".ana_demo"
    gen_args = dict(n_train=args.nTrain, n_val=args.nVal, n_test=args.nTest,
                    tiles_x=args.tilesX, tiles_y=args.tilesY, tile_size=args.tileSize,
                    seed=args.seed)
    if max_labels is not None:
        gen_args["max_labels"] = max_labels
    record = {"format": MARKER_FORMAT, **gen_args}
    if not _write_once(csv_path if csv_path.exists() else None, marker, record, args.force, title, csv_path,
                       lambda: generate_ana_demo(out, **gen_args)):
        return csv_path
    w, h = args.tilesX * args.tileSize, args.tilesY * args.tileSize
    print(f"Wrote {title} demo: {args.nTrain} train / {args.nVal} val / {args.nTest} test images "
          f"({w}x{h} px, {args.tilesX}x{args.tilesY} tiles) -> {csv_path}")
    return csv_path


def _write_once(found: Path | None, marker: Path, record: dict, force: bool, title: str, shown: Path,
                write) -> bool:
    """Call ``write()`` unless ``marker`` records the same arguments; returns whether it wrote.

    ``found`` is existing data in the target folder (None when empty): without a marker it was
    not written by this script and is only replaced with ``force``.
    """
    if found is not None and not force:
        if not marker.exists():
            raise UserError(f"{found} exists and was not written by make_demo_data.py; "
                            f"use --force to overwrite it or choose another --out")
        try:
            same = json.loads(marker.read_text()) == record
        except (OSError, ValueError):
            same = False
        if same:
            print(f"{title} demo data already there: {shown} (same arguments; --force rebuilds)")
            return False
    marker.unlink(missing_ok=True)  # an interrupted run must not look complete
    write()
    marker.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return True


def _make_cryoem(args: argparse.Namespace) -> Path:
    """CryoEM PU demo: <out>/cryoem/preprocessed_data.pt (or chunks) and the marker .cryoem_demo."""
    out = Path(args.out) / "cryoem"
    marker = out / ".cryoem_demo"
    gen_args = dict(n_pos=args.nPositive, n_unl=args.nUnlabeled, n_val=args.nEval, n_test=args.nEval,
                    patch_size=args.patchSize, prior=args.prior, seed=args.seed, chunk_size=args.chunkSize)
    record = {"format": MARKER_FORMAT, **gen_args}
    existing = sorted(out.glob("preprocessed_data.pt")) + sorted(out.glob("chunk_*.pt"))
    if not _write_once(existing[0] if existing else None, marker, record, args.force, "CryoEM", out,
                       lambda: generate_cryoem_demo(out, **gen_args)):
        return out
    print(f"Wrote CryoEM demo: {args.nPositive} positive / {args.nUnlabeled} unlabelled (prior {args.prior}) / "
          f"{args.nEval} val / {args.nEval} test patches of {args.patchSize} px -> {out}")
    return out


def _make_micrographs(args: argparse.Namespace) -> Path:
    """Generated micrographs with particle coordinates in <out>/micrographs/ (marker .micrographs_demo)."""
    out = Path(args.out) / "micrographs"
    marker = out / ".micrographs_demo"
    gen_args = dict(n_micrographs=args.nMicrographs, size=args.micrographSize, seed=args.seed)
    record = {"format": MARKER_FORMAT, **gen_args}
    existing = out / "coordinates.star"
    if not _write_once(existing if existing.exists() else None, marker, record, args.force, "micrograph", out,
                       lambda: generate_micrograph_demo(out, **gen_args)):
        return out
    print(f"Wrote micrograph demo: {args.nMicrographs} micrographs of {args.micrographSize} px with particle "
          f"coordinates -> {out}")
    return out


def _make_ana_single(args: argparse.Namespace) -> Path:
    """Single-label ANA demo (one pattern per image) in <out>/ana_single/, for main_single.py."""
    return _make_ana(args, Path(args.out) / "ana_single", max_labels=1, title="single-label ANA")


FAMILIES = {"ana": _make_ana, "ana_single": _make_ana_single, "cryoem": _make_cryoem,
            "micrographs": _make_micrographs}  # name -> writer(args) returning its data path


@exit_on_user_error
def main(argv=None) -> Path:
    """Write the chosen demo families; returns the CSV path of the first one written."""
    args = build_parser().parse_args(argv)
    names = list(FAMILIES) if args.family == "all" else [args.family]
    paths = []
    for name in names:
        try:
            paths.append(FAMILIES[name](args))
        except ValueError as e:  # bad sizes: a one-line message, not a traceback
            raise UserError(f"--family {name}: {e}") from None
    return paths[0]


if __name__ == "__main__":
    main()
