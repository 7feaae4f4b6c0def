"""Pick particles on micrographs with a model trained by train_pu_selective_fixmatch.py.

    python pick_particles.py --checkpoint experiments/my_run/best_model.pt \
        --micrographs MotionCorr/job002/Movies/*.mrc --output-dir picks --overlay

Writes to --output-dir (utils/picking/outputs.py has the layout): one <micrograph>_autopick.star per
micrograph in a folder tree that mirrors the micrographs' paths and the autopick.star index
(RELION 4/5: Extract's input coordinates), picks.star (every pick, _rlnMicrographName = the path as
given; cryoSPARC's Import Particle Stack), picks.csv, box/<tree>/<micrograph>.box (EMAN),
candidates.star (every candidate above --score-floor, for rethreshold_picks.py), score_histogram.png,
overlays/ with --overlay, picking.json and picking.log. Coordinates are in the original
micrographs' pixels whatever downsampling the model was trained with (--invert-y: in the frame of
an image flipped upside down). The threshold defaults to the one training chose (auto); change it
later without the network: python rethreshold_picks.py --picks picks --threshold 0.3.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from datasets.micrographs import PIXEL_SIZE_TOLERANCE, list_micrographs, read_micrograph, resolve_pixel_size
from models.dense import DENSE_CONTEXT, MODES
from utils.checks import float_arg, int_arg
from utils.device import resolve_device
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.logger import progress
from utils.picking.outputs import (PickStaging, flip_y, micrograph_entries, text_histogram, write_overlays,
                                   write_picks, write_summary_files)
from utils.picking.picker import (DEFAULT_FLOOR, DEFAULT_TILE, PickSettings, ThresholdChoice, check_micrographs,
                                  load_picker, pick_micrograph, resolve_settings, resolve_threshold, window_size)
from utils.run import claim_run_dir, run_frame


def threshold_value(text):
    """``auto`` or a probability in [0, 1] (argparse type of --threshold)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1] or auto, got {text!r}")
    return value


def build_parser():
    p = ArgumentParser(description="Particle coordinates from micrographs: probability map, one greedy "
                                   "non-maximum suppression at --min-distance, sub-cell refinement, "
                                   "picks above --threshold, files for RELION and cryoSPARC.")
    p.add_argument("--checkpoint", required=True, help="best_model.pt of a CryoEM training run")
    p.add_argument("--micrographs", nargs="+", required=True,
                   help="micrograph files, folders or glob patterns (.mrc .tif .tiff .png .jpg); give them "
                        "relative to a RELION project directory to get paths RELION finds")
    p.add_argument("--output-dir", required=True, help="folder for the coordinate files")
    p.add_argument("--threshold", type=threshold_value, default="auto",
                   help="keep picks with probability >= this; auto = the rule training stored in the checkpoint: "
                        "the best-F1 threshold on labelled val micrographs, else as many picks as the data's prior "
                        "says a micrograph holds (default: %(default)s)")
    p.add_argument("--score-floor", type=float_arg(0, 1), default=DEFAULT_FLOOR,
                   help="candidates.star keeps every candidate down to this score (or the threshold, when "
                        "lower), so rethreshold_picks.py can lower the threshold later (default: %(default)s)")
    p.add_argument("--min-distance", type=float_arg(0, low_open=True), default=None,
                   help="smallest distance between two picks in original px (default: the particle radius "
                        "given to preprocess_cryoem.py)")
    p.add_argument("--particle-diameter-A", type=float_arg(0, low_open=True), default=None,
                   help="particle diameter in Angstrom: --min-distance defaults to its radius and --box-size to it, "
                        "in px of the pixel size (default: the particle radius given to preprocess_cryoem.py)")
    p.add_argument("--pixel-size", type=float_arg(0, low_open=True), default=None,
                   help="Angstrom per pixel of the micrographs, written into the STAR files (default: the MRC "
                        "headers, else the training data's; JPG/PNG/TIFF carry none); micrographs of different "
                        "pixel sizes in one run, or of another pixel size than the training data's, are an error")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="average the maps of the 8 rotations and flips of each micrograph (8x the map's time) "
                        "(default: off)")
    p.add_argument("--stride", type=int_arg(1), default=16,
                   help="step of the probability map in px of the downsampled micrograph; must divide 32 in "
                        "dense mode; 16 ranks particles as well as 8 (EMPIAR-10017: AP 0.686 / 0.685, 0.565 at "
                        "32) in a quarter of the time, 8 centres picks 3 px closer (default: %(default)s)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                   help="move each pick to the peak of a quadratic fitted to the map around it, below the "
                        "map's cell (default: on)")
    p.add_argument("--tile-size", type=int_arg(0), default=DEFAULT_TILE,
                   help="largest side in px (of the downsampled micrograph) of the tiles the dense trunk runs "
                        "on; bounds memory, the map is the same; 0 = the whole micrograph at once "
                        "(default: %(default)s: under 2 GiB for a 4096 x 4096 micrograph on the CPU)")
    p.add_argument("--invert-y", action=argparse.BooleanOptionalAction, default=False,
                   help="write y as H - 1 - y: for images (JPG/PNG exports) flipped upside down relative to "
                        "the MRC files RELION or cryoSPARC will extract from (default: off)")
    p.add_argument("--downsample", type=float_arg(1), default=None,
                   help="downsampling factor (default: the one the training data were made with)")
    p.add_argument("--normalize", choices=["zscore", "none"], default=None,
                   help="per-micrograph normalisation (default: the training data's)")
    p.add_argument("--mode", choices=MODES, default="dense",
                   help="dense: the trunk runs once over the micrograph; within ~0.01 of crops for a model trained "
                        "with 64 px of context (preprocess_cryoem.py's default); crops: the classifier on every "
                        "patch, the slow reference (default: %(default)s)")
    p.add_argument("--model", choices=["model", "student"], default="model",
                   help="model = the EMA teacher, student = the student network (default: %(default)s)")
    p.add_argument("--box-size", type=int_arg(1), default=None,
                   help="box side written to BOX files, original px (default: the particle diameter)")
    p.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=False,
                   help="write overlays/<tree>/<micrograph>.png: picks in green, candidates below the threshold "
                        "in grey (default: off)")
    p.add_argument("--batch-size", type=int_arg(1), default=256, help="crops per forward pass in crops mode (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    return p


@dataclass(frozen=True)
class PickJob:
    """What a picking run works with once its inputs are checked: the network and its checkpoint,
    how to pick (:class:`~utils.picking.picker.PickSettings`, the threshold's
    :class:`~utils.picking.picker.ThresholdChoice`), the micrographs (``paths`` and their
    :class:`~utils.picking.outputs.MicrographEntry`), and the particle ``radius`` (overlays),
    ``box_size`` (BOX files) and ``pixel_size`` (STAR files, None when unknown)."""
    model: object
    ckpt: dict
    device: object
    settings: PickSettings
    choice: ThresholdChoice
    paths: list
    entries: list
    radius: float
    box_size: int
    pixel_size: float | None = None


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    folders = [out / "box"] + ([out / "overlays"] if args.overlay else [])
    lock = claim_run_dir(out, "--output-dir", hint="or choose another --output-dir", folders=folders)
    device = resolve_device(args.device)
    model, ckpt = load_picker(args.checkpoint, device, args.model)
    choice = resolve_threshold(ckpt, args.checkpoint, args.threshold)
    paths = list_micrographs(args.micrographs)
    pixel_size, pixel_note = picking_pixel_size(paths, args.pixel_size, ckpt, args.checkpoint, args.downsample)
    min_distance, box_from_A = args.min_distance, None
    if args.particle_diameter_A is not None:
        if pixel_size is None:
            raise UserError(f"--particle-diameter-A {args.particle_diameter_A:g} needs the pixel size: pass "
                            f"--pixel-size A/px (the micrographs have no MRC header with one, and {args.checkpoint}'s "
                            f"data none), or --min-distance in px")
        box_from_A = args.particle_diameter_A / pixel_size
        min_distance = min_distance if min_distance is not None else box_from_A / 2
    settings = resolve_settings(ckpt, args.checkpoint, choice.value, min_distance=min_distance,
                                downsample=args.downsample, normalization=args.normalize, stride=args.stride,
                                mode=args.mode, batch_size=args.batch_size, refine=args.refine,
                                max_tile=args.tile_size or None, floor=args.score_floor, tta=args.tta)
    # every micrograph's header (readable, large enough) before anything is written
    sizes = check_micrographs(paths, settings, window_size(ckpt))
    entries = micrograph_entries(paths, sizes)
    radius = float((ckpt.get("data_metadata") or {}).get("particle_radius", settings.min_distance))
    if box_from_A is not None:
        radius = box_from_A / 2
    job = PickJob(model=model, ckpt=ckpt, device=device, settings=settings, choice=choice, paths=paths,
                  entries=entries, radius=radius, box_size=args.box_size or round(2 * radius), pixel_size=pixel_size)
    staging = PickStaging(out)
    with run_frame(out, lock, "picking.log", name="pick_particles", folders=folders, staging=staging,
                   rerun=(__file__, argv)) as logger:
        if pixel_note:
            logger.info(pixel_note)
        return _pick(args, job, staging, logger)


def picking_pixel_size(paths, given, ckpt, path, downsample=None):
    """``(Angstrom per pixel or None, a line for the log)`` of the micrographs to pick: ``--pixel-size``,
    else their MRC headers, else the training data's (``data_metadata.pixel_size``). Micrographs at
    another pixel size than the training data's are a :class:`UserError` unless ``--downsample`` is
    given: the network only knows particles at the scale it was trained on."""
    mine, source = resolve_pixel_size(paths, given)
    meta = ckpt.get("data_metadata") or {}
    trained = meta.get("pixel_size")
    trained = float(trained) if isinstance(trained, (int, float)) and trained > 0 else None
    if mine is None:
        if trained is None:
            return None, ""
        return trained, f"pixel size {trained:g} A/px (the training data's; the micrographs carry none)"
    if trained is not None and abs(mine - trained) > trained * PIXEL_SIZE_TOLERANCE and downsample is None:
        factor = float(meta.get("downsample", 1.0)) * trained / mine
        raise UserError(f"{paths[0]}: pixel size {mine:g} A/px (from {source}), but {path} was trained on micrographs "
                        f"of {trained:g} A/px; pick micrographs of the training's pixel size, or pass --downsample "
                        f"{factor:.4g} to bring them to the training's scale")
    return mine, f"pixel size {mine:g} A/px (from {source})"


def _pick(args, job, staging, logger):
    """Pick every micrograph of ``job`` (a :class:`PickJob`) into ``staging``, then install the
    files; return picking.json's dict."""
    out = args.output_dir
    settings, ckpt, device, paths, entries = job.settings, job.ckpt, job.device, job.paths, job.entries
    logger.info(f"{args.checkpoint}: backbone {ckpt['backbone']}, patch {settings.patch_size} px, downsample "
                f"{settings.downsample:g}, {settings.mode} map at stride {settings.stride}"
                + (f" in tiles of at most {settings.max_tile} px" if settings.max_tile else "")
                + f", min distance {settings.min_distance:g} px, refine {'on' if settings.refine else 'off'}, "
                f"TTA {'on (8 rotations/flips)' if settings.tta else 'off'}, "
                f"device {device}; candidates down to {settings.candidate_floor:g}"
                + (", y inverted (H - 1 - y)" if args.invert_y else ""))
    context = int(ckpt.get("context", 0))
    if settings.mode == "dense" and context < DENSE_CONTEXT:
        logger.warning(f"{args.checkpoint} was trained with {context} px of context; its dense map can "
                       f"differ from its own crop classifier (README, 'Context and dense picking'): use --mode "
                       f"crops, or preprocess with --context {DENSE_CONTEXT} and retrain")
    found, per_mic = [], {}
    for entry, path in progress(list(zip(entries, paths)), desc="picking"):
        t0 = time.perf_counter()
        array = read_micrograph(path)
        if array.shape != (entry.height, entry.width):
            raise UserError(f"{path}: decoded as {array.shape[1]}x{array.shape[0]} px, but its header says "
                            f"{entry.width}x{entry.height}")
        candidates, _, timing = pick_micrograph(job.model, array, settings, device, name=entry.path)
        seconds = time.perf_counter() - t0
        per_mic[entry.key] = {**asdict(entry), "abspath": str(Path(path).resolve()), "n_candidates": len(candidates),
                              "seconds": seconds, **timing}
        logger.info(f"{path}: {len(candidates)} candidates in {seconds:.2f} s (map {timing['map_s']:.2f} s)")
        found.append(candidates)
    candidates = pd.concat(found, ignore_index=True)
    if args.invert_y:
        candidates = flip_y(candidates, {e.key: e.height for e in entries})
    # numbers as candidates.star stores them (6 decimals): re-thresholding that file gives the same files
    candidates[["x", "y", "score"]] = candidates[["x", "y", "score"]].round(6)
    threshold, rule = job.choice.apply(candidates["score"], [e.height * e.width for e in entries], settings.floor)
    logger.info(f"threshold {threshold:.4g} ({rule})")
    picks, counts = write_picks(staging, out, candidates, threshold, entries, job.box_size, job.pixel_size)
    for key, n in counts.items():
        per_mic[key]["n_picks"] = n
    if args.overlay:
        write_overlays(staging, entries, {k: m["abspath"] for k, m in per_mic.items()}, candidates, threshold,
                       job.radius, args.invert_y)
    total = sum(m["seconds"] for m in per_mic.values())
    summary = {"checkpoint": str(args.checkpoint), "settings": asdict(settings), "threshold": threshold,
               "threshold_rule": rule, "score_floor": settings.candidate_floor, "box_size": job.box_size,
               "invert_y": bool(args.invert_y), "overlays": bool(args.overlay), "particle_radius": job.radius,
               "pixel_size": job.pixel_size,
               "device": str(device), "n_micrographs": len(paths), "n_picks": len(picks),
               "n_candidates": len(candidates), "seconds_per_micrograph": total / len(paths), "micrographs": per_mic}
    write_summary_files(staging, candidates, threshold, summary)
    for line in text_histogram(candidates["score"], threshold):
        logger.info(f"scores {line}")
    staging.install()
    logger.info(f"{len(picks)} picks on {len(paths)} micrographs ({', '.join(map(str, counts.values()))}), "
                f"{total / len(paths):.2f} s per micrograph -> {out}: autopick.star + {len(entries)} *_autopick.star "
                f"(RELION), picks.star (cryoSPARC), picks.csv, box/, candidates.star, score_histogram.png")
    return summary


if __name__ == "__main__":
    main()
