"""Pick particles on micrographs with a model trained by train_pu_selective_fixmatch.py.

    python pick_particles.py --checkpoint experiments/my_run/best_model.pt \
        --micrographs data/micrographs --output-dir picks --threshold 0.5 --overlay

Writes to --output-dir: picks.star (RELION: _rlnMicrographName, _rlnCoordinateX/Y,
_rlnAutopickFigureOfMerit), picks.csv (micrograph,x,y,score), box/<micrograph>.box (EMAN,
lower-left corner + box size), overlays/<micrograph>.png with --overlay, and picking.json
(settings, picks and seconds per micrograph). Coordinates are in the original micrographs'
pixels whatever downsampling the model was trained with. To evaluate the ranking with
evaluate_picks.py, pick with --threshold 0 (every local maximum) and let the evaluation
apply its threshold.
"""
import argparse
import time
from pathlib import Path

import pandas as pd

from datasets.micrographs import list_micrographs, micrograph_key, read_micrograph, write_box, write_csv, write_star
from models.dense import DENSE_CONTEXT, MODES
from utils.checks import check_output_dir, float_arg, int_arg
from utils.device import resolve_device
from utils.errors import ArgumentParser, exit_on_user_error
from utils.figures import save_png
from utils.logger import close_run_logger, progress, setup_run_logger
from utils.particle_picker import check_micrographs, load_picker, overlay_image, pick_micrograph, resolve_settings
from utils.results import write_json
from utils.run_lock import RunLock


def build_parser():
    p = ArgumentParser(description="Particle coordinates from micrographs: probability map, local maxima "
                                            "above --threshold, non-maximum suppression at --min-distance.")
    p.add_argument("--checkpoint", required=True, help="best_model.pt of a CryoEM training run")
    p.add_argument("--micrographs", nargs="+", required=True,
                   help="micrograph files, folders or glob patterns (.mrc .tif .tiff .png .jpg)")
    p.add_argument("--output-dir", required=True, help="folder for the coordinate files")
    p.add_argument("--threshold", type=float_arg(0, 1), default=0.5,
                   help="keep local maxima with probability >= this (default: %(default)s)")
    p.add_argument("--min-distance", type=float_arg(0, low_open=True), default=None,
                   help="smallest distance between two picks in original px (default: the particle radius "
                        "given to preprocess_cryoem.py)")
    p.add_argument("--stride", type=int_arg(1), default=32,
                   help="step of the probability map in px of the downsampled micrograph; must divide 32 in "
                        "dense mode (default: %(default)s)")
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
                   help="write overlays/<micrograph>.png with the picks drawn (default: off)")
    p.add_argument("--batch-size", type=int_arg(1), default=256,
                   help="crops per forward pass in crops mode (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    return p


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    folders = [out, out / "box"] + ([out / "overlays"] if args.overlay else [])
    for folder in folders:
        check_output_dir(folder, "--output-dir")
    lock = RunLock(out, hint="or choose another --output-dir")
    lock.check()
    device = resolve_device(args.device)
    model, ckpt = load_picker(args.checkpoint, device, args.model)
    settings = resolve_settings(ckpt, args.checkpoint, args.threshold, args.min_distance, args.downsample,
                                args.normalize, args.stride, args.mode, args.batch_size)
    paths = list_micrographs(args.micrographs)
    check_micrographs(paths, settings, ckpt.get("context", 0))  # before anything is written
    radius = float((ckpt.get("data_metadata") or {}).get("particle_radius", settings.min_distance))
    box_size = args.box_size or round(2 * radius)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    logger = setup_run_logger("pick_particles", out / "picking.log")
    try:
        lock.tidy(logger, folders[1:])
        logger.info(f"{args.checkpoint}: backbone {ckpt['backbone']}, patch {settings.patch_size} px, downsample "
                    f"{settings.downsample:g}, {settings.mode} map at stride {settings.stride}, threshold "
                    f"{settings.threshold:g}, min distance {settings.min_distance:g} px, device {device}")
        context = int(ckpt.get("context", 0))
        if settings.mode == "dense" and context < DENSE_CONTEXT:
            logger.warning(f"{args.checkpoint} was trained with {context} px of context; its dense map can "
                           f"differ from its own crop classifier (README, 'Context and dense picking'): use --mode "
                           f"crops, or preprocess with --context {DENSE_CONTEXT} and retrain")
        all_picks, per_mic = [], {}
        for path in progress(paths, desc="picking"):
            t0 = time.perf_counter()
            array = read_micrograph(path)
            picks, _, timing = pick_micrograph(model, array, settings, device, name=path.name)
            write_box(out / "box" / f"{micrograph_key(path.name)}.box", picks, box_size)
            if args.overlay:
                save_png(out / "overlays" / f"{micrograph_key(path.name)}.png", overlay_image(array, picks, radius))
            seconds = time.perf_counter() - t0
            per_mic[path.name] = {"n_picks": len(picks), "seconds": seconds, **timing}
            logger.info(f"{path.name}: {len(picks)} picks in {seconds:.2f} s (map {timing['map_s']:.2f} s)")
            all_picks.append(picks)
        picks = pd.concat(all_picks, ignore_index=True)
        write_star(out / "picks.star", picks)
        write_csv(out / "picks.csv", picks)
        total = sum(m["seconds"] for m in per_mic.values())
        summary = {"checkpoint": str(args.checkpoint), "settings": settings.__dict__, "box_size": box_size,
                   "device": str(device), "n_micrographs": len(paths), "n_picks": len(picks),
                   "seconds_per_micrograph": total / len(paths), "micrographs": per_mic}
        write_json(out / "picking.json", summary)
        logger.info(f"{len(picks)} picks on {len(paths)} micrographs, {total / len(paths):.2f} s per micrograph "
                    f"-> {out / 'picks.star'}, picks.csv, box/")
        return summary
    finally:
        close_run_logger(logger)
        lock.release()


if __name__ == "__main__":
    main()
