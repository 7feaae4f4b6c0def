"""``evaluate_picks.py`` called in-process: output files, their content, the table, bad inputs.

The numbers are those of the hand-worked example in tests/test_picking.py (repeated below).
"""
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import evaluate_picks
from datasets.micrographs import write_star

# Picks (CSV, micrograph "m1.mrc") against four reference particles (STAR, "Micrographs/m1.jpg"),
# radius 5: ranked 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP (second pick on T0), 0.4 TP (exactly 5 px).
# AP = (1 + 2/3 + 3/5) / 4 = 17/30; threshold 0.5: 4 picks, 2 TP -> P = R = F1 = 1/2;
# best F1 = 2/3 at 0.4 (P 3/5, R 3/4).
PICKS_CSV = """micrograph,x,y,score
m1.mrc,150,150,0.8
m1.mrc,100,103,0.6
m1.mrc,297,104,0.4
m1.mrc,101,100,0.9
m1.mrc,200,102,0.7
"""
REFERENCE = pd.DataFrame({"micrograph": ["Micrographs/m1.jpg"] * 4, "x": [100.0, 200.0, 300.0, 400.0],
                          "y": [100.0, 100.0, 100.0, 400.0], "score": [np.nan] * 4})


@pytest.fixture
def files(tmp_path):
    (tmp_path / "picks").mkdir()
    picks = tmp_path / "picks" / "picks.csv"
    picks.write_text(PICKS_CSV)
    reference = tmp_path / "reference.star"
    write_star(reference, REFERENCE)
    return picks, reference


def test_outputs_and_numbers(files, capsys):
    picks, reference = files
    result = evaluate_picks.main(["--picks", str(picks), "--reference", str(reference), "--radius", "5"])
    out_dir = picks.parent  # the default: the picks file's folder
    assert sorted(p.name for p in out_dir.iterdir()) == ["evaluation.json", "picks.csv", "pr_curve.png"]
    saved = json.loads((out_dir / "evaluation.json").read_text())
    assert saved == result
    assert saved["picks"] == str(picks) and saved["reference"] == str(reference)
    assert (saved["radius"], saved["threshold"]) == (5.0, 0.5)
    assert list(saved["per_micrograph"]) == ["m1"]
    m = saved["overall"]
    assert (m["n_picks_total"], m["n_targets"], m["n_picks"], m["tp"]) == (5, 4, 4, 2)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    assert m["average_precision"] == pytest.approx(17 / 30, abs=1e-12)
    assert m["best_f1"] == pytest.approx(2 / 3, abs=1e-12) and m["best_f1_threshold"] == 0.4
    assert m["curve"]["threshold"] == [0.9, 0.8, 0.7, 0.6, 0.4]
    image = Image.open(out_dir / "pr_curve.png")
    assert image.format == "PNG" and image.size == (480, 400) and image.mode == "RGB"

    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["micrograph", "picks", "targets", "P", "R", "F1", "AP", "best", "F1", "@", "thr",
                                "dist", "mean/p90", "px"]
    # matched at 0.5: 0.9 at 1 px and 0.7 at 2 px from their particles -> mean 1.5, p90 1 + 0.9 = 1.9
    assert lines[1].split() == ["m1", "4", "4", "0.500", "0.500", "0.500", "0.567", "0.667", "@", "0.4", "1.5", "/",
                                "1.9"]
    assert lines[2].split() == ["overall", "4", "4", "0.500", "0.500", "0.500", "0.567", "0.667", "@", "0.4", "1.5",
                                "/", "1.9"]
    assert m["distance_mean"] == pytest.approx(1.5) and m["distance_p90"] == pytest.approx(1.9)
    assert saved["matching"] == "greedy" and saved["invert_y"] is False
    assert len(lines) == 3


def test_output_dir_micrographs_threshold_box_folder(files, tmp_path):
    # reference as a folder of BOX files (micrograph = file stem): m1 as above (box 20: corner
    # = centre - 10), m2 with one particle. --micrographs m1 m2: m2 has no picks, so its
    # particle counts as missed. Threshold 0.65: picks 0.9 TP, 0.8 FP, 0.7 TP -> P 2/3, R 2/5;
    # AP over 5 targets = (1 + 2/3 + 3/5) / 5 = 34/75.
    picks, _ = files
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    (boxes / "m1.box").write_text("90\t90\t20\t20\n190\t90\t20\t20\n290\t90\t20\t20\n390\t390\t20\t20\n")
    (boxes / "m2.box").write_text("40\t40\t20\t20\n")
    out = tmp_path / "out" / "nested"
    result = evaluate_picks.main(["--picks", str(picks), "--reference", str(boxes), "--radius", "5",
                                  "--threshold", "0.65", "--micrographs", "m1", "m2", "--output-dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "pr_curve.png"]
    assert sorted(p.name for p in picks.parent.iterdir()) == ["picks.csv"]
    saved = json.loads((out / "evaluation.json").read_text())
    assert list(saved["per_micrograph"]) == ["m1", "m2"]
    m2 = saved["per_micrograph"]["m2"]
    assert (m2["n_picks_total"], m2["n_targets"], m2["recall"], m2["best_f1_threshold"]) == (0, 1, 0.0, None)
    assert math.isnan(result["per_micrograph"]["m2"]["best_f1_threshold"])  # NaN -> null in the file
    m = saved["overall"]
    assert (m["n_picks"], m["tp"], m["n_targets"]) == (3, 2, 5)
    assert m["precision"] == pytest.approx(2 / 3, abs=1e-12) and m["recall"] == pytest.approx(2 / 5, abs=1e-12)
    assert m["average_precision"] == pytest.approx(34 / 75, abs=1e-12)


def run_error(capsys, argv):
    """Run main expecting a user error: exit code 2, no traceback, and the one ``error: ...``
    line last on stderr (after the lines saying what was read); return that line."""
    with pytest.raises(SystemExit) as exc:
        evaluate_picks.main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    return lines[-1]


@pytest.mark.parametrize("extra, message", [
    (["--radius", "5", "--micrographs", "m1", "zz.mrc"], r"^error: micrographs 'zz': not in the reference; expected .*'m1'$"),
    (["--radius", "0"], r"^error: argument --radius: expected a finite number > 0, got '0' \(see .* --help\)$"),
    (["--radius", "nan"], r"^error: argument --radius: expected a finite number > 0, got 'nan'"),
    (["--radius", "5", "--threshold", "inf"], r"^error: argument --threshold: expected a finite number, got 'inf'"),
    (["--radius", "5", "--invert-y"], r"^error: --invert-y needs each micrograph's height: .*picks.csv has no "
                                      r"picking.json beside it; pass --micrograph-dir$"),
])
def test_bad_arguments(files, capsys, extra, message):
    picks, reference = files
    err = run_error(capsys, ["--picks", str(picks), "--reference", str(reference), *extra])
    assert re.search(message, err)
    assert sorted(p.name for p in picks.parent.iterdir()) == ["picks.csv"]  # nothing written


def test_bad_files(files, tmp_path, capsys):
    picks, reference = files
    # picks on a micrograph the reference does not have
    other = tmp_path / "other.csv"
    other.write_text("micrograph,x,y,score\nm1,1,1,0.5\nFalcon_9.jpg,1,1,0.5\n")
    err = run_error(capsys, ["--picks", str(other), "--reference", str(reference), "--radius", "5"])
    assert err.startswith("error: picks: micrographs 'Falcon_9' have no particles in the reference; "
                          "expected names of the reference such as 'm1'")
    assert not (tmp_path / "evaluation.json").exists()
    # a missing file
    err = run_error(capsys, ["--picks", str(tmp_path / "nope.star"), "--reference", str(reference), "--radius", "5"])
    assert "nope.star" in err
    # --radius is required (argparse's own exit 2)
    with pytest.raises(SystemExit) as exc:
        evaluate_picks.main(["--picks", str(picks), "--reference", str(reference)])
    assert exc.value.code == 2 and "the following arguments are required: --radius" in capsys.readouterr().err


def test_parser_defaults():
    args = evaluate_picks.build_parser().parse_args(["--picks", "p", "--reference", "r", "--radius", "3"])
    assert (args.threshold, args.micrographs, args.output_dir, args.radius) == (None, None, None, 3.0)
    assert (args.matching, args.invert_y, args.micrograph_dir) == ("greedy", False, None)
    help_text = " ".join(evaluate_picks.build_parser().format_help().split())
    assert "else 0.5" in help_text and "(default: greedy)" in help_text
