"""Smoke test on the real ANA images in ../shared/data (skipped when that folder is absent)."""
import json

import pandas as pd
import pytest

import main
from conftest import SHARED_DATA

AGH = SHARED_DATA / "ana_agh"


@pytest.mark.skipif(not (AGH / "annotations.csv").is_file(), reason="../shared/data/ana_agh is not present")
def test_one_epoch_on_real_ana_images(tmp_path):
    result = main.main(["--annFile", str(AGH / "annotations.csv"), "--imageDir", str(AGH / "images"),
                        "--numClasses", "0", "--arch", "resnet18", "--imageSize", "32", "--no-pretrained",
                        "--epoch", "1", "--numWorkers", "0", "--cacheDir", str(tmp_path / "cache"),
                        "--pathModelParams", str(tmp_path / "run"), "--initWeight", "iw-sample",
                        "--updateLR", "ulr-adaptive", "--sampling", "--trainingLabel", "pseudo"])
    truth = pd.read_csv(AGH / "annotations.csv", dtype=str)
    test_rows = truth[truth["Split"] == "test"]
    predictions = pd.read_csv(tmp_path / "run" / "test_predictions.csv", dtype={"target": str})
    assert list(predictions["path"]) == list(test_rows["path"])
    assert [c for c in predictions.columns if c.startswith("prob_")] == [f"prob_{k}" for k in range(7)]
    record = json.loads((tmp_path / "run" / "results.json").read_text())[0]
    assert record["test_results"]["n_samples"] == len(test_rows)
    assert result["val"]["n_samples"] > len(truth[truth["Split"] == "val"])  # validation is on tiles
