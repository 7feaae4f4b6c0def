"""Score particle picks against reference coordinates: precision, recall, F1, AP, PR curve.

    python evaluate_picks.py --picks picks/candidates.star --reference reference.star --radius 27 \
        [--threshold 0.5] [--micrographs Falcon_1 Falcon_2] [--matching assignment] [--invert-y]

Coordinates may be STAR, BOX, CSV/TSV/TXT files or folders of them (datasets/micrographs.py
reads them and says which columns it used). Micrographs are matched by name without folder and
image suffix. Within each micrograph picks and reference particles are matched one to one within
--radius pixels: greedily by descending score (default) or by an optimal assignment that ignores
the scores (--matching assignment, as Topaz's precision-recall tool); the precision/recall of
every threshold is a point of the same PR curve (utils/picking/matching.py).

Picks written by pick_particles.py carry a picking.json beside them: it gives the default
--threshold (the one the picks were made at), the micrographs that were picked (one without any
pick counts its particles as missed), and the heights --invert-y needs.

Writes evaluation.json (all numbers, per micrograph and overall, with the overall PR curve and the
distances from matched picks to their particles) and pr_curve.png into --output-dir, and prints
one row per micrograph and the overall row.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from datasets.micrographs import (drop_duplicate_coordinates, list_micrographs, micrograph_key, micrograph_shape,
                                  read_coordinates)
from utils.checks import check_output_dir, float_arg
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.figures import pr_curve_image, save_png
from utils.io import write_json
from utils.logger import close_run_logger, setup_run_logger
from utils.picking.matching import MATCHINGS, evaluate_picks
from utils.picking.outputs import CANDIDATES_NAME, SUMMARY_NAME, flip_y


def build_parser():
    parser = ArgumentParser(
        description="Score particle picks against reference coordinates (precision, recall, F1, "
                    "average precision, best-F1 threshold), per micrograph and overall.")
    parser.add_argument("--picks", required=True,
                        help="picked coordinates with scores: a STAR, BOX, CSV/TSV/TXT file or a folder of them; "
                             "an output folder of pick_particles.py means its candidates.star (required)")
    parser.add_argument("--reference", required=True,
                        help="reference (true) particle coordinates, same formats as --picks (required)")
    parser.add_argument("--radius", type=float_arg(0, low_open=True), required=True,
                        help="a pick matches a reference particle whose centre is at most this many pixels "
                             "away; often the particle radius (required, no default: it depends on the data)")
    parser.add_argument("--threshold", type=float_arg(), default=None,
                        help="picks with score >= this count as picked for precision/recall/F1 "
                             "(default: the threshold of picking.json beside the picks, else 0.5; AP and best F1 "
                             "use every pick)")
    parser.add_argument("--micrographs", nargs="+", default=None, metavar="NAME",
                        help="evaluate these micrographs only; one without picks counts its particles as missed "
                             "(default: the micrographs picking.json lists, else every micrograph that has picks)")
    parser.add_argument("--matching", choices=MATCHINGS, default="greedy",
                        help="greedy: picks by descending score take the nearest free particle; assignment: the "
                             "most pairs within --radius whatever the scores, as Topaz's precision-recall tool "
                             "(default: %(default)s)")
    parser.add_argument("--invert-y", action=argparse.BooleanOptionalAction, default=False,
                        help="flip the REFERENCE upside down (y -> H - 1 - y) before matching: for picks made with "
                             "pick_particles.py --invert-y against references in the image's own frame, or the "
                             "reverse; heights come from picking.json or --micrograph-dir (default: off)")
    parser.add_argument("--micrograph-dir", default=None,
                        help="folder of the micrographs, for their heights with --invert-y when the picks have no "
                             "picking.json (default: none)")
    parser.add_argument("--output-dir", default=None,
                        help="folder for evaluation.json and pr_curve.png (default: the folder of --picks, "
                             "or --picks itself when it is a folder)")
    return parser


def _fmt(value, spec=".3f"):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(result):
    """One text row per micrograph and the overall row: picks, targets, P, R, F1, AP, best F1 @ threshold."""
    rows = list(result["per_micrograph"].items()) + [("overall", result["overall"])]
    width = max(len("micrograph"), *(len(key) for key, _ in rows))
    lines = [f"{'micrograph':<{width}} {'picks':>7} {'targets':>7} {'P':>6} {'R':>6} {'F1':>6} {'AP':>6}  "
             f"best F1 @ thr   dist mean/p90 px"]
    for key, m in rows:
        lines.append(f"{key:<{width}} {m['n_picks']:>7d} {m['n_targets']:>7d} {_fmt(m['precision']):>6} "
                     f"{_fmt(m['recall']):>6} {_fmt(m['f1']):>6} {_fmt(m['average_precision']):>6}  "
                     f"{_fmt(m['best_f1'])} @ {_fmt(m['best_f1_threshold'], '.4g'):<6} "
                     f"{_fmt(m.get('distance_mean'), '.1f')} / {_fmt(m.get('distance_p90'), '.1f')}")
    return "\n".join(lines)


def picking_summary(picks_path):
    """picking.json of pick_particles.py beside ``picks_path`` (its folder, or the folder itself), or None."""
    folder = picks_path if picks_path.is_dir() else picks_path.parent
    path = folder / SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); move it away to evaluate without it") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("micrographs"), dict):
        raise UserError(f"{path}: has no 'micrographs' dict; expected a picking.json written by pick_particles.py")
    return summary


def _heights(summary, micrograph_dir, picks_path):
    """``{micrograph key: height}`` for --invert-y, from picking.json or the micrographs' headers."""
    if micrograph_dir is not None:
        return {micrograph_key(p.name): micrograph_shape(p)[0] for p in list_micrographs(micrograph_dir)}
    if summary is None:
        raise UserError(f"--invert-y needs each micrograph's height: {picks_path} has no picking.json beside it; "
                        f"pass --micrograph-dir")
    return {m["key"]: int(m["height"]) for m in summary["micrographs"].values()}


@exit_on_user_error
def main(argv=None):
    """Parse ``argv`` (default: sys.argv), evaluate, write the outputs and return the evaluation dict
    (the content of evaluation.json)."""
    args = build_parser().parse_args(argv)
    picks_path, reference_path = Path(args.picks), Path(args.reference)
    if args.output_dir is not None:
        output_dir = Path(args.output_dir)
    else:
        output_dir = picks_path if picks_path.is_dir() else picks_path.parent
    check_output_dir(output_dir, "--output-dir" if args.output_dir is not None else "the folder of --picks")
    summary = picking_summary(picks_path)
    if picks_path.is_dir() and summary is not None:  # a pick_particles.py folder: its whole ranking
        picks_path = picks_path / CANDIDATES_NAME
    picks, picks_info = read_coordinates(picks_path)
    reference, reference_info = read_coordinates(reference_path)
    print(f"picks: {picks_info}", file=sys.stderr)
    print(f"reference: {reference_info}", file=sys.stderr)
    log = setup_run_logger("evaluate_picks", None)  # the terminal only
    try:  # a particle listed twice would count twice (a pick twice: a false positive)
        picks = drop_duplicate_coordinates(picks, str(picks_path), log)
        reference = drop_duplicate_coordinates(reference, str(reference_path), log)
    finally:
        close_run_logger(log)
    threshold = args.threshold
    if threshold is None:
        threshold = float(summary["threshold"]) if summary is not None and "threshold" in summary else 0.5
        print(f"threshold {threshold:g} ({'the picking threshold, ' + SUMMARY_NAME if summary else 'default'})",
              file=sys.stderr)
    micrographs = args.micrographs
    if micrographs is None and summary is not None:
        micrographs = [m["key"] for m in summary["micrographs"].values()]
    if args.invert_y:
        heights = _heights(summary, args.micrograph_dir, picks_path)
        missing = sorted(set(reference["micrograph"].map(micrograph_key)) - set(heights))
        evaluated = set(map(micrograph_key, micrographs)) if micrographs is not None else None
        missing = [k for k in missing if evaluated is None or k in evaluated]
        if missing:
            raise UserError(f"--invert-y: no height known for micrograph {missing[0]!r} of {reference_path}")
        reference = reference[reference["micrograph"].map(micrograph_key).isin(set(heights))]
        reference = flip_y(reference, heights)

    result = evaluate_picks(picks, reference, args.radius, threshold, micrographs=micrographs, matching=args.matching)
    result = {"picks": str(picks_path), "reference": str(reference_path), "invert_y": bool(args.invert_y), **result}
    write_json(output_dir / "evaluation.json", result)
    overall = result["overall"]
    curve = overall["curve"]
    label = f"overall (AP {_fmt(overall['average_precision'])})"
    image = pr_curve_image({label: (curve["recall"], curve["precision"])},
                           title=f"{picks_path.name} vs {reference_path.name}, radius {args.radius:g} px")
    save_png(output_dir / "pr_curve.png", image)
    print(format_table(result))
    print(f"wrote {output_dir / 'evaluation.json'} and {output_dir / 'pr_curve.png'}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
