"""Re-threshold the picks of a pick_particles.py run without running the network again.

    python rethreshold_picks.py --picks picks --threshold 0.3

Reads picks/picking.json and picks/candidates.star (every candidate above the score floor, with
its score) and rewrites the coordinate files (autopick.star, the *_autopick.star tree, picks.star,
picks.csv, box/), score_histogram.png and picking.json for the new threshold, in --picks itself or
in --output-dir. The picks are exactly those a pick_particles.py run at that threshold writes:
greedy non-maximum suppression decides each candidate from the higher-scored ones only, so the
picks at a threshold are the candidates at or above it. Overlays are redrawn from the micrographs
when the picking run made them (--no-overlay drops them).
"""
import argparse
import json
import math
from pathlib import Path

from datasets.micrographs import micrograph_shape, read_coordinates
from utils.checks import float_arg
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.picking.outputs import (CANDIDATES_NAME, SUMMARY_NAME, PickStaging, entries_from_summary, text_histogram,
                                   write_overlays, write_picks, write_summary_files)
from utils.run import claim_run_dir, run_frame


def build_parser():
    p = ArgumentParser(description="Rewrite the picks of a pick_particles.py output folder at another "
                                   "threshold, from its candidates.star (no network).")
    p.add_argument("--picks", required=True, help="output folder of pick_particles.py (holds picking.json and "
                                                   "candidates.star)")
    p.add_argument("--threshold", type=float_arg(0, 1), required=True,
                   help="keep the candidates with score >= this; at least the run's score floor (required)")
    p.add_argument("--output-dir", default=None,
                   help="write the new files here (default: --picks itself, replacing its picks)")
    p.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=None,
                   help="redraw overlays/ from the micrographs (default: when the picking run drew them)")
    return p


def read_picking_run(folder):
    """``(picking.json dict, candidates table)`` of a pick_particles.py output folder; UserError naming
    the file when one is missing or not what pick_particles.py writes."""
    folder = Path(folder)
    path = folder / SUMMARY_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found; expected the output folder of pick_particles.py")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("micrographs", "score_floor", "box_size", "invert_y", "threshold")
               if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}; expected a picking.json written by "
                        f"pick_particles.py")
    if not (folder / CANDIDATES_NAME).is_file():
        raise UserError(f"{folder / CANDIDATES_NAME}: not found; expected the candidates of pick_particles.py")
    candidates, _ = read_coordinates(folder / CANDIDATES_NAME)
    if candidates["score"].isna().any():
        raise UserError(f"{folder / CANDIDATES_NAME}: has candidates without a score; expected "
                        f"_rlnAutopickFigureOfMerit on every row")
    known = {m["path"] for m in summary["micrographs"].values()}
    unknown = sorted(set(candidates["micrograph"]) - known)
    if unknown:
        raise UserError(f"{folder / CANDIDATES_NAME}: micrograph {unknown[0]!r} is not listed in {path}")
    return summary, candidates


@exit_on_user_error
def main(argv=None):
    """Re-threshold; return the new picking.json dict."""
    args = build_parser().parse_args(argv)
    summary, candidates = read_picking_run(args.picks)
    floor = float(summary["score_floor"])
    if not math.isfinite(args.threshold) or not floor <= args.threshold <= 1:
        raise UserError(f"--threshold is {args.threshold}, expected a probability in [{floor:g}, 1] (the run's "
                        f"candidates stop at its score floor {floor:g}: pick again with a lower --score-floor)")
    entries = entries_from_summary(summary)
    overlay = summary.get("overlays", False) if args.overlay is None else args.overlay
    sources = {m["key"]: m.get("abspath", m["path"]) for m in summary["micrographs"].values()}
    if overlay:  # every micrograph's header is read before anything is written
        for source in sources.values():
            micrograph_shape(source)
    out = args.output_dir if args.output_dir is not None else args.picks
    lock = claim_run_dir(out, "--output-dir" if args.output_dir is not None else "--picks",
                         hint="or choose another --output-dir")
    staging = PickStaging(out)
    with run_frame(out, lock, "picking.log", name="rethreshold_picks", staging=staging,
                   rerun=(__file__, argv)) as logger:
        picks, counts = write_picks(staging, out, candidates, args.threshold, entries, summary["box_size"],
                                    summary.get("pixel_size"))
        if overlay:
            write_overlays(staging, entries, sources, candidates, args.threshold, summary["particle_radius"],
                           summary["invert_y"])
        micrographs = {k: {**m, "n_picks": counts[k]} for k, m in summary["micrographs"].items()}
        new = {**summary, "threshold": float(args.threshold), "overlays": bool(overlay),
               "threshold_rule": f"rethreshold_picks.py (was {summary['threshold']:.4g}: "
                                 f"{summary.get('threshold_rule', '?')})",
               "n_picks": len(picks), "micrographs": micrographs}
        new.pop("files", None)
        write_summary_files(staging, candidates, args.threshold, new)
        logger.info(f"{args.picks}: threshold {summary['threshold']:.4g} -> {args.threshold:.4g}: {len(picks)} "
                    f"of {len(candidates)} candidates -> {out}")
        for line in text_histogram(candidates["score"], args.threshold):
            logger.info(f"scores {line}")
        staging.install()
    return json.loads((Path(out) / SUMMARY_NAME).read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
