"""benchmarks/empiar_study.py: the whole pipeline per row on tiny generated micrographs."""
import json

import pytest

from benchmarks import empiar_study


def test_smoke_run_prints_one_row_per_setting_and_writes_json(tmp_path, capsys):
    out = tmp_path / "study.json"
    summary = empiar_study.main(["--smoke", "--work-dir", str(tmp_path / "w"), "--out", str(out), "--device", "cpu"])
    names = [r["name"] for r in summary["results"]]
    assert names == [empiar_study.ROWS[i][0] for i in (0, 1, 9, 2)]
    base, tta, stride32, labelled = summary["results"]
    for r in summary["results"]:
        run = r["runs"][0]
        assert 0 <= run["ap"] <= 1 and 0 <= run["best_f1"] <= 1 and run["pick_s_per_micrograph"] > 0
        assert run["f1_default"] <= run["best_f1"] + 1e-9  # the best F1 is the best over all thresholds
    # the picking rows reuse the base model (same training time), the labelled row trains its own
    assert base["runs"][0]["train_s"] == tta["runs"][0]["train_s"] == stride32["runs"][0]["train_s"] > 0
    assert labelled["runs"][0]["train_s"] > 0 and labelled["train"]["fraction"] == 1.0
    assert tta["pick"]["tta"] and stride32["pick"]["stride"] == 32
    printed = capsys.readouterr().out
    assert sum(line.startswith("| ") for line in printed.splitlines()) == 1 + 4 and "| setting | seeds | AP | best F1 |" in printed
    saved = json.loads(out.read_text())
    assert saved["table"] == summary["table"] and saved["stopped"] is None


def test_budget_stops_cleanly_and_still_prints_the_table(tmp_path, capsys):
    summary = empiar_study.main(["--smoke", "--work-dir", str(tmp_path / "w"), "--device", "cpu", "--budget-s", "0"])
    assert summary["stopped"].startswith("budget") and all(not r["runs"] for r in summary["results"])
    printed = capsys.readouterr().out
    assert "| setting |" in printed and "(budget: stopped" in printed
    assert json.loads((tmp_path / "w" / "study.json").read_text())["stopped"] == summary["stopped"]


def test_bad_rows_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        empiar_study.main(["--smoke", "--work-dir", str(tmp_path), "--rows", "99"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --rows 99")


def test_dense_speed_times_both_trunks(capsys):
    from benchmarks import dense_speed
    out = dense_speed.main(["--size", "256", "--strides", "16", "32", "--tta"])
    assert [(r["stride"], r["dilated"], r["tta"]) for r in out["rows"]] == [
        (16, True, False), (16, False, False), (32, False, False), (16, True, True), (32, False, True)]
    assert all(r["seconds"] >= r["map_s"] > 0 for r in out["rows"])
    assert "shift-and-stitch" in capsys.readouterr().out
