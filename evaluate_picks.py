"""Score particle picks against reference coordinates: precision, recall, F1, AP, PR curve.

    python evaluate_picks.py --picks picks.star --reference reference.star --radius 27 \
        [--threshold 0.5] [--micrographs Falcon_1 Falcon_2] [--output-dir DIR]

Coordinates may be STAR, BOX, CSV/TSV/TXT files or folders of them (datasets/micrographs.py
reads them and says which columns it used). Micrographs are matched by name without folder and
image suffix. Within each micrograph picks are taken by descending score and each one matches
the nearest still-unmatched reference particle within --radius pixels (one-to-one); the
precision/recall of every threshold is a point of the same PR curve (utils/picking.py).

Writes evaluation.json (all numbers, per micrograph and overall, with the overall PR curve) and
pr_curve.png into --output-dir, and prints one row per micrograph and the overall row.
"""
import math
import sys
from pathlib import Path

from datasets.micrographs import read_coordinates
from utils.checks import check_output_dir, float_arg
from utils.errors import ArgumentParser, exit_on_user_error
from utils.figures import pr_curve_image, save_png
from utils.picking import evaluate_picks
from utils.results import write_json


def build_parser():
    parser = ArgumentParser(
        description="Score particle picks against reference coordinates (precision, recall, F1, "
                    "average precision, best-F1 threshold), per micrograph and overall.")
    parser.add_argument("--picks", required=True,
                        help="picked coordinates with scores: a STAR, BOX, CSV/TSV/TXT file or a folder of them "
                             "(required)")
    parser.add_argument("--reference", required=True,
                        help="reference (true) particle coordinates, same formats as --picks (required)")
    parser.add_argument("--radius", type=float_arg(0, low_open=True), required=True,
                        help="a pick matches a reference particle whose centre is at most this many pixels "
                             "away; often the particle radius (required, no default: it depends on the data)")
    parser.add_argument("--threshold", type=float_arg(), default=0.5,
                        help="picks with score >= this count as picked for precision/recall/F1 "
                             "(default: %(default)s; AP and best F1 use every pick)")
    parser.add_argument("--micrographs", nargs="+", default=None, metavar="NAME",
                        help="evaluate these micrographs only; one without picks counts its particles as missed "
                             "(default: every micrograph that has picks)")
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
    lines = [f"{'micrograph':<{width}} {'picks':>7} {'targets':>7} {'P':>6} {'R':>6} {'F1':>6} {'AP':>6}  best F1 @ thr"]
    for key, m in rows:
        lines.append(f"{key:<{width}} {m['n_picks']:>7d} {m['n_targets']:>7d} {_fmt(m['precision']):>6} "
                     f"{_fmt(m['recall']):>6} {_fmt(m['f1']):>6} {_fmt(m['average_precision']):>6}  "
                     f"{_fmt(m['best_f1'])} @ {_fmt(m['best_f1_threshold'], '.4g')}")
    return "\n".join(lines)


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
    picks, picks_info = read_coordinates(picks_path)
    reference, reference_info = read_coordinates(reference_path)
    print(f"picks: {picks_info}", file=sys.stderr)
    print(f"reference: {reference_info}", file=sys.stderr)

    result = evaluate_picks(picks, reference, args.radius, args.threshold, micrographs=args.micrographs)
    result = {"picks": str(picks_path), "reference": str(reference_path), **result}
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
