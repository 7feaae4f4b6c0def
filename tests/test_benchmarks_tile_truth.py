"""benchmarks/ana_tile_truth.py: its measures on hand-made files, and its --smoke run (seconds on a CPU)."""
import json
import math

import pandas as pd
import pytest

from benchmarks import ana_tile_truth as bench


def test_weight_aucs_per_label_count(tmp_path):
    # image a (labels 0 1): tile 0 shows 0, tile 1 shows 1; image b (labels 0 1 2): only tile 0 shows 2
    truth = {"a.png": [{0}, {1}], "b.png": [{0, 1}, {0, 1, 2}, {0, 1}]}
    rows = [("a.png", 0, 0, 0.9), ("a.png", 0, 1, 0.2), ("a.png", 1, 0, 0.3), ("a.png", 1, 1, 0.8),
            ("b.png", 0, 2, 0.1), ("b.png", 1, 2, 0.5), ("b.png", 2, 2, 0.3)]
    frame = pd.DataFrame(rows, columns=["path", "tile", "class", "weight"])
    frame["bag_labels"] = frame["path"].map({"a.png": "0 1", "b.png": "0 1 2"})
    frame.to_csv(tmp_path / "w.csv", index=False)
    aucs = bench.weight_aucs(tmp_path / "w.csv", truth)
    assert aucs["weight_auc_2"] == 1.0  # the shown pairs (0.9, 0.8) outrank the others (0.2, 0.3)
    assert aucs["weight_auc_3"] == 1.0  # one shown pair, 0.5, above 0.1 and 0.3
    frame.loc[frame["path"] == "b.png", "weight"] = [0.6, 0.5, 0.3]  # 0.5 now beats only 0.3: AUC 1/2
    frame.to_csv(tmp_path / "w.csv", index=False)
    assert bench.weight_aucs(tmp_path / "w.csv", truth)["weight_auc_3"] == 0.5


def test_tile_auc_skips_classes_without_both_kinds_of_tiles(tmp_path):
    truth = {"a.png": [{0}, {1}], "b.png": [{0}, {0, 1}]}
    frame = pd.DataFrame({"path": ["a.png", "a.png", "b.png", "b.png"], "tile": [0, 1, 0, 1],
                          "prob_0": [0.9, 0.1, 0.8, 0.7], "prob_1": [0.2, 0.6, 0.4, 0.3], "prob_2": [0.5] * 4})
    frame.to_csv(tmp_path / "p.csv", index=False)
    # class 0: positives 0.9, 0.8, 0.7 vs negative 0.1 -> 1; class 1: 0.6, 0.3 vs 0.2, 0.4 -> 3/4; class 2: none
    assert bench.tile_auc(tmp_path / "p.csv", truth, 3) == pytest.approx((1.0 + 0.75) / 2)


def test_smoke_run_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    results = bench.main(["--smoke", "--sweep", "--levels", "tile", "--device", "cpu", "--out", str(out)])
    assert set(results["methods"]) == {"baseline / valLevel tile", "adam / valLevel tile", "sgd / valLevel tile"}
    assert set(results["sweep"]) == {"0.01", "0.3"}
    baseline = results["methods"]["baseline / valLevel tile"]["summary"]
    # --weight_lr 0: every weight keeps its initial 1, so no pair is ranked above another
    assert baseline["weight_auc_2"]["mean"] == 0.5
    for entry in [*results["methods"].values(), *results["sweep"].values()]:
        for key in ("f1_mi", "f1_ma", "acc_total", "mAP", "tile_auc"):
            assert 0.0 <= entry["summary"][key]["mean"] <= 1.0, key
    saved = json.loads(out.read_text())
    assert saved["size"]["n_train"] == bench.SIZES["smoke"]["n_train"]
    text = capsys.readouterr().out
    tables = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(tables) == 2 + 3 + 2  # two header rows, three methods, two sweep lrs
    assert "| sgd --weight_lr 0.01 |" in text and not math.isnan(results["seconds"])
