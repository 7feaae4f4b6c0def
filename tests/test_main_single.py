"""Tests of ``main_single.py`` (single-label ANA training) and of the single-label pieces.

- rows with more than one label are dropped from every split, with a count in the log;
- the single-label metrics (top-1 accuracy, balanced accuracy, confusion matrix) agree with
  scikit-learn;
- a 2-epoch CPU run writes the same outputs as ``main.py`` plus ``confusion_matrix.csv`` and a
  TensorBoard image, and its test metrics come from the ``test`` split at bag level (the
  reference evaluated ``val`` and called it test);
- the reference specifics (pseudo-label targets, sampler refreshed every second epoch) are the
  defaults, a flag turns each off, and a resumed run continues exactly.
"""
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

import config
import config_single
import main
import main_single
from conftest import cpu_argv
from datasets.ana import load_splits
from utils.metrics import singlelabel_metrics

NUM_CLASSES = 4  # the tiny dataset of conftest.py


def _mixed_targets(df):
    """Give the tiny dataset a known mix: every third row of each split has two labels."""
    df = df.copy()
    for split in ("train", "val", "test"):
        idx = df.index[df["Split"] == split]
        for k, i in enumerate(idx):
            df.loc[i, "TARGET"] = "0 2" if k % 3 == 1 else str(k % NUM_CLASSES)
    return df


@pytest.fixture(scope="module")
def mixed_dirs(tiny_ana_master, tmp_path_factory):
    """The tiny dataset with single- and two-label rows in every split, and a shared tile cache."""
    root = tmp_path_factory.mktemp("single")
    data = root / "data"
    shutil.copytree(tiny_ana_master, data)
    csv = data / "annotations.csv"
    df = _mixed_targets(pd.read_csv(csv, dtype=str, keep_default_na=False))
    df.to_csv(csv, index=False)
    return {"data": data, "df": df, "cache": root / "cache"}


@pytest.fixture
def mixed_data(mixed_dirs):
    """(data directory, annotation frame) of the mixed dataset; read-only for the tests."""
    return mixed_dirs["data"], mixed_dirs["df"]


def _single_counts(df):
    single = df["TARGET"].str.split().map(len) == 1
    return {split: int((single & (df["Split"] == split)).sum()) for split in ("train", "val", "test")}


def _load(data, cfg):
    """datasets.ana.load_splits as a run of ``cfg`` calls it, on ``data``'s CSV and images."""
    sources = dict.fromkeys(("train", "test"), (data / "annotations.csv", data / "images"))
    return load_splits(sources, 128, num_classes=NUM_CLASSES, single_label=cfg.SINGLE_LABEL)


# ------------------------------------------------------------------------------ 1. filtering

def test_single_label_config_keeps_only_one_label_rows(mixed_data):
    data, df = mixed_data
    tiles, num_classes, notes = _load(data, config_single)
    expected = _single_counts(df)
    assert num_classes == NUM_CLASSES
    for split, ts in tiles.items():
        assert len(ts.bags) == expected[split], split
        assert torch.equal(ts.bag_labels.sum(dim=1), torch.ones(expected[split])), split
        wanted = df[(df["Split"] == split) & (df["TARGET"].str.split().map(len) == 1)]["path"].tolist()
        assert ts.bags["path"].tolist() == wanted, split  # the same rows, in CSV order
    dropped = {split: int((df["Split"] == split).sum()) - n for split, n in expected.items()}
    assert all(dropped.values())
    for split, note in zip(("train", "val", "test"), notes):
        assert f"{split}: kept {expected[split]} single-label rows, dropped {dropped[split]}" in note


def test_multi_label_config_keeps_every_row(mixed_data):
    data, df = mixed_data
    tiles, _, notes = _load(data, config)
    assert notes == []
    for split, ts in tiles.items():
        assert len(ts.bags) == int((df["Split"] == split).sum())


def test_split_without_single_label_rows_is_a_user_error(tiny_ana, tmp_path, capsys):
    csv = tiny_ana / "annotations.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df["TARGET"] = np.where(df["Split"] == "test", "1 3", "1")
    df.to_csv(csv, index=False)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main_single.main(cpu_argv(tiny_ana, run_dir, tmp_path / "cache", "--epoch", "1"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert str(csv) in err[0] and "single-label rows" in err[0] and "'test'" in err[0]
    assert not run_dir.exists()  # nothing written


# ------------------------------------------------------------------------- 2. the metrics

@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_singlelabel_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 3, 1, 1, 0, 2, 3, 3, 0, 1])
    y_true = np.eye(5)[labels]  # class 4 never occurs: its confusion row stays zero
    y_score = rng.random((len(labels), 5))
    m = singlelabel_metrics(y_true, y_score)
    pred = y_score.argmax(axis=1)
    assert m["top1_acc"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=range(5)).tolist()
    assert np.asarray(m["confusion_matrix"]).shape == (5, 5) and sum(map(sum, m["confusion_matrix"])) == 12
    # the shared multi-label metrics are still there
    assert m["f1_mi"] == pytest.approx(skm.f1_score(y_true, y_score >= 0.5, average="micro", zero_division=0))


def test_singlelabel_metrics_top1_is_not_the_thresholded_accuracy():
    y_true = np.eye(3)[[0, 1, 2]]
    y_score = np.array([[0.4, 0.1, 0.1], [0.2, 0.3, 0.1], [0.1, 0.2, 0.45]])  # argmax right, all < 0.5
    m = singlelabel_metrics(y_true, y_score)
    assert m["top1_acc"] == 1.0 and m["acc_total"] == 0.0
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_singlelabel_metrics_reject_multi_label_rows():
    with pytest.raises(ValueError, match="row 1 has 2"):
        singlelabel_metrics(np.array([[1, 0], [1, 1]]), np.array([[0.9, 0.1], [0.5, 0.5]]))


# ------------------------------------------------------------------------- 3. a 2-epoch run

@pytest.fixture(scope="module")
def single_run(mixed_dirs):
    run_dir = mixed_dirs["cache"].parent / "single_run"
    result = main_single.main(cpu_argv(mixed_dirs["data"], run_dir, mixed_dirs["cache"], "--saveModel",
                                       "--epoch", "2", "--lr", "1e-3"))
    return {"result": result, "run_dir": run_dir, "df": mixed_dirs["df"]}


def test_single_run_tests_on_the_single_label_test_images(single_run):
    run_dir, df = single_run["run_dir"], single_run["df"]
    preds = pd.read_csv(run_dir / "test_predictions.csv", dtype={"target": str})
    test_single = df[(df["Split"] == "test") & (df["TARGET"].str.split().map(len) == 1)]
    assert len(preds) == len(test_single)
    assert preds["path"].tolist() == test_single["path"].tolist()  # test split, not val
    assert preds["target"].tolist() == test_single["TARGET"].tolist()
    probs = preds[[f"prob_{k}" for k in range(NUM_CLASSES)]].to_numpy()
    assert preds["pred"].tolist() == probs.argmax(axis=1).tolist()

    records = json.loads((run_dir / "results.json").read_text())
    last = records[-1]["test_results"]
    truth = preds["target"].astype(int).to_numpy()
    assert last["n_samples"] == len(test_single)
    assert last["top1_acc"] == pytest.approx(skm.accuracy_score(truth, probs.argmax(axis=1)), abs=1e-6)
    assert last["confusion_matrix"] == skm.confusion_matrix(truth, probs.argmax(axis=1),
                                                            labels=range(NUM_CLASSES)).tolist()
    assert single_run["result"]["test"]["confusion_matrix"] == last["confusion_matrix"]
    # validation is image-level (max over the 4 tiles) on the single-label val images
    n_val = int(((df["Split"] == "val") & (df["TARGET"].str.split().map(len) == 1)).sum())
    assert all(r["val_results"]["n_samples"] == n_val for r in records)


def test_single_run_confusion_matrix_csv(single_run):
    run_dir = single_run["run_dir"]
    frame = pd.read_csv(run_dir / "confusion_matrix.csv", index_col="class")
    assert list(frame.index) == [f"true_{k}" for k in range(NUM_CLASSES)]
    assert list(frame.columns) == [f"pred_{k}" for k in range(NUM_CLASSES)]
    records = json.loads((run_dir / "results.json").read_text())
    assert frame.to_numpy().tolist() == records[-1]["test_results"]["confusion_matrix"]


def test_single_run_outputs_and_log(single_run):
    run_dir = single_run["run_dir"]
    names = {p.name for p in run_dir.iterdir()}
    assert {"output.txt", "results.json", "test_predictions.csv", "confusion_matrix.csv", "last.pt",
            "args.json"} <= names
    records = json.loads((run_dir / "results.json").read_text())
    for key, suffix in (("f1_mi", "f1mi"), ("f1_ma", "f1ma"), ("acc_total", "acc"), ("mAP", "mAP")):
        epoch = max(r["epoch"] for r in records if key in r["improved"])
        assert f"{epoch}_{suffix}.pt" in names
    log = (run_dir / "output.txt").read_text()
    assert "dropped" in log and "top1_acc" in log
    assert "epoch 2 |" in log
    args = json.loads((run_dir / "args.json").read_text())
    assert (args["trainingLabel"], args["resampleEvery"], args["sampling"]) == ("pseudo", 2, True)
    assert (args["weightGroups"], args["valLevel"], args["weight_lr"]) == ("one", "image", None)
    assert (args["weight_lr_used"], args["SINGLE_LABEL"], args["config_module"]) == (args["lr"], True, "config_single")
    assert "weights: Adam, one group, learning rate 0.001 (--lr)" in log


def test_single_run_tensorboard_has_the_confusion_image(single_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(single_run["run_dir"]), size_guidance={"images": 0})
    events.Reload()
    records = json.loads((single_run["run_dir"] / "results.json").read_text())
    assert "test/confusion_matrix" in events.Tags()["images"]
    assert [e.step for e in events.Images("test/confusion_matrix")] == [r["epoch"] for r in records]
    assert "test/top1_acc" in events.Tags()["scalars"]


# --------------------------------------------------------- 4. reference specifics and resume

def test_parser_defaults_come_from_config_single():
    args = main_single.build_parser().parse_args([])
    assert args.trainingLabel == config_single.TRAINING_LABEL == "pseudo"
    assert args.resampleEvery == config_single.RESAMPLE_EVERY == 2
    assert args.initWeight == "iw-ones" and args.granularity == "label"
    assert args.sampling is True and args.weight_lr is None and args.weightGroups == "one"
    assert args.valLevel == "image" and args.resetOptimizer is True and args.weightOptimizer == "adam"
    assert main_single.build_parser().parse_args(["--weightOptimizer", "sgd"]).weightOptimizer == "sgd"
    main_args = main.build_parser().parse_args([])
    assert (main_args.sampling, main_args.weightGroups, main_args.valLevel) == (False, "count", "tile")
    assert main_args.weight_lr == config.WEIGHT_LR
    assert (args.lr, args.epoch, args.arch) == (config_single.LR, config_single.EPOCHS, config_single.ARCH)
    assert config_single.SINGLE_LABEL and not config.SINGLE_LABEL
    assert config_single.PATH_TRAIN_ANNFILE != config.PATH_TRAIN_ANNFILE


def test_main_single_has_exactly_the_flags_of_main():
    def flags(parser):
        return {opt for action in parser._actions for opt in action.option_strings}

    assert flags(main_single.build_parser()) == flags(main.build_parser())


def _sampler_weights_after(mixed_dirs, tmp_path, run, *extra):
    main_single.main(cpu_argv(mixed_dirs["data"], tmp_path / run, mixed_dirs["cache"], "--epoch", "2",
                              "--lr", "1e-3", "--weight_lr", "0.05", *extra))
    return torch.load(tmp_path / run / "last.pt", map_location="cpu", weights_only=True)


def test_sampler_is_refreshed_every_second_epoch(mixed_dirs, tmp_path):
    every2 = _sampler_weights_after(mixed_dirs, tmp_path, "every2")
    every1 = _sampler_weights_after(mixed_dirs, tmp_path, "every1", "--resampleEvery", "1")
    # epoch 2 of --resampleEvery 2 still samples by the initial weights (1 on each positive label)
    assert torch.equal(every2["sampler_weights"], torch.ones_like(every2["sampler_weights"]))
    # --resampleEvery 1 recomputed them from the weights learned in epoch 1
    assert not torch.equal(every1["sampler_weights"], torch.ones_like(every1["sampler_weights"]))
    assert every1["sampler_weights"].max() <= 1.0


def test_single_resume_continues_exactly(mixed_dirs, tmp_path):
    data, cache = mixed_dirs["data"], mixed_dirs["cache"]
    common = ("--lr", "1e-3", "--weight_lr", "0.05", "--saveModel")
    main_single.main(cpu_argv(data, tmp_path / "A", cache, *common, "--epoch", "3"))
    # resume at epoch 2, which does not refresh the sampler: it must reuse epoch 1's probabilities
    main_single.main(cpu_argv(data, tmp_path / "B", cache, *common, "--epoch", "1"))
    main_single.main(cpu_argv(data, tmp_path / "B", cache, *common, "--epoch", "3", "--loadModel"))
    a = torch.load(tmp_path / "A" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "B" / "last.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert torch.equal(a["sampler_weights"], b["sampler_weights"])
    assert torch.allclose(a["weights"]["alpha"], b["weights"]["alpha"], atol=1e-5, rtol=0)
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-5, rtol=0), key
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "A" / "confusion_matrix.csv"),
                                  pd.read_csv(tmp_path / "B" / "confusion_matrix.csv"))


def test_ulr_adaptive_on_single_label_data_is_explained_in_the_log(mixed_dirs, tmp_path):
    main_single.main(cpu_argv(mixed_dirs["data"], tmp_path / "run", mixed_dirs["cache"], "--epoch", "1",
                              "--updateLR", "ulr-adaptive", "--weightGroups", "count"))
    log = (tmp_path / "run" / "output.txt").read_text()
    assert "ulr-adaptive gives every weight learning rate 0" in log


def test_weights_share_one_group_at_the_network_lr_and_are_never_reset(mixed_dirs, tmp_path):
    data, cache = mixed_dirs["data"], mixed_dirs["cache"]
    main_single.main(cpu_argv(data, tmp_path / "run", cache, "--epoch", "1", "--lr", "2e-3"))
    one = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    main_single.main(cpu_argv(data, tmp_path / "run", cache, "--epoch", "2", "--lr", "2e-3", "--loadModel"))
    two = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    w = two["weights"]
    assert w["grouping"] == "one" and torch.equal(w["group"], torch.zeros_like(w["group"]))
    assert w["group_lr"].tolist() == [pytest.approx(2e-3)]  # the network's --lr, no weight lr of its own
    # one tensor that takes a step on every training step and is never reset: its step count
    # is the run's number of steps (the network's Adam counts the same steps)
    net_steps = max(int(s["step"]) for s in two["optimizer"]["state"].values())
    assert w["steps"].tolist() == [float(net_steps)]
    assert w["steps"].item() > one["weights"]["steps"].item() > 0
    assert two["optimizer"]["state"] and int(one["optimizer"]["state"][0]["step"]) < net_steps


def test_sampler_probabilities_refresh_on_odd_epochs(mixed_dirs, tmp_path):
    from models.sample_weights import sampler_weights
    data, cache = mixed_dirs["data"], mixed_dirs["cache"]
    argv = ("--lr", "1e-3", "--weight_lr", "0.05")
    main_single.main(cpu_argv(data, tmp_path / "run", cache, *argv, "--epoch", "2"))
    two = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert torch.equal(two["sampler_weights"], torch.ones_like(two["sampler_weights"]))  # epoch 2: epoch 1's
    main_single.main(cpu_argv(data, tmp_path / "run", cache, *argv, "--epoch", "3", "--loadModel"))
    three = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    labels = (two["targets"] > 0).float()  # main_single keeps the bag labels as targets' positives
    expected = sampler_weights(two["weights"]["alpha"], labels)  # epoch 3: from the weights after epoch 2
    assert torch.allclose(three["sampler_weights"].float(), expected.float())
    assert not torch.equal(expected, torch.ones_like(expected))


def test_image_level_val_chooses_the_best_models(mixed_dirs, tmp_path):
    from datasets.ana import CachedTileDataset, build_tile_cache
    from models.backbones import build_resnet_classifier
    from utils.ana.epoch import BatchPreprocessor, bag_max, predict
    from utils.metrics import singlelabel_metrics
    data, cache = mixed_dirs["data"], mixed_dirs["cache"]
    argv = cpu_argv(data, tmp_path / "run", cache, "--saveModel", "--epoch", "2", "--lr", "1e-3")
    main_single.main(argv)
    records = json.loads((tmp_path / "run" / "results.json").read_text())
    args = main_single.build_parser().parse_args(argv)
    val = main.load_data(main.resolve_settings(args, config_single), logging.getLogger("test_main_single"))[0]["val"]
    loader = torch.utils.data.DataLoader(CachedTileDataset(build_tile_cache(val, 32, cache)), batch_size=16)
    preprocess = BatchPreprocessor(config_single.MEAN, config_single.STD, torch.device("cpu"))
    epoch = max(r["epoch"] for r in records if "mAP" in r["improved"])
    model = build_resnet_classifier("resnet18", NUM_CLASSES, False)
    model.load_state_dict(torch.load(tmp_path / "run" / f"{epoch}_mAP.pt", weights_only=True))
    image_val = singlelabel_metrics(val.bag_labels, bag_max(predict(model, loader, preprocess), val.tile_bag,
                                                            len(val.bags)))
    recorded = next(r for r in records if r["epoch"] == epoch)["val_results"]
    assert recorded["n_samples"] == len(val.bags) < len(val)  # images, not tiles
    assert recorded["mAP"] == pytest.approx(image_val["mAP"], abs=1e-6)
    assert recorded["f1_mi"] == pytest.approx(image_val["f1_mi"], abs=1e-6)
