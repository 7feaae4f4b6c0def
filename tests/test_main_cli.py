"""End-to-end tests of ``main.py``: tiny CPU runs called in-process through ``main.main([...])``.

What they pin down (README, ANA "Outputs"):

- the content of every output file of a 2-epoch run of the full model: ``output.txt``,
  ``results.json``, ``test_predictions.csv`` (recomputed here from the saved weights: maximum
  over each test image's tiles), the ``{epoch}_{metric}.pt`` best-model files, ``last.pt``,
  the TensorBoard events and ``args.json``;
- a run without ``--saveModel`` (the reference crashed there);
- ``--loadModel`` resumes exactly where a run stopped, and a run directory is never reused by
  accident;
- every bad input ends with exit code 2, one ``error: ...`` line naming the culprit, no
  traceback, and nothing already written is lost;
- the CLI defaults the README documents (the reference code's), and pre-tiled CSVs (``--bagColumn``).

Runs are kept to 1-2 epochs of a resnet18 on 32 px tiles (see ``ana_args`` in conftest.py).
"""
import argparse
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

import config
import main
from conftest import cpu_argv
from utils.checkpoint import save_checkpoint
from utils.metrics import multilabel_metrics

# The full model of the paper. A small network lr keeps the tiny network's probabilities away
# from exactly 0/1 (so the prediction checks mean something); on today's tiny data it also makes
# epoch 2 a new best for some metrics only, so superseded best-model files get deleted. No test
# relies on that: the expected files are derived from results.json.
FULL_MODEL = ("--initWeight", "iw-sample", "--updateLR", "ulr-adaptive", "--granularity", "label",
              "--sampling", "--trainingLabel", "pseudo", "--lr", "3e-4", "--weight_lr", "1e-3")
# Metrics every results.json entry must hold, and the README's best-model file suffixes.
METRIC_KEYS = ("acc_total", "f1_mi", "f1_ma", "mAP", "hamming_loss", "one_error", "ranking_loss", "coverage")
BEST_FILE_SUFFIX = {"f1_mi": "f1mi", "f1_ma": "f1ma", "acc_total": "acc", "mAP": "mAP"}
NUM_CLASSES = 4  # the tiny dataset of conftest.py


# ------------------------------------------------------------------------------------ helpers

def _read_csv(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _multi_hot(target_strings, num_classes=NUM_CLASSES):
    out = np.zeros((len(target_strings), num_classes), dtype=np.int64)
    for i, text in enumerate(target_strings):
        out[i, [int(t) for t in text.split()]] = 1
    return out


def _snapshot(directory):
    """{relative path: sha256} of every file under ``directory``."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _link_copy(src, dst):
    """Private copy of a run directory; the large ``*.pt`` files are hard links (cheap: the code
    replaces them atomically, and an in-place edit would show up in the byte comparisons).
    Everything else is copied, since output.txt is appended to in place."""
    def copy(s, d):
        return os.link(s, d) if s.endswith(".pt") else shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=copy)


def _expect_user_error(capsys, argv):
    """Run main, expect exit code 2 without a traceback; return the stderr lines."""
    capsys.readouterr()  # drop anything printed before
    with pytest.raises(SystemExit) as exc:
        main.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err.splitlines()


def _assert_names(line, culprits):
    for culprit in culprits:
        if isinstance(culprit, re.Pattern):
            assert culprit.search(line), f"{culprit.pattern!r} not in {line!r}"
        else:
            assert culprit in line, f"{culprit!r} not in {line!r}"


def _assert_single_error_line(lines, *culprits):
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    _assert_names(lines[0], culprits)


def _resnet(state, arch, num_classes=NUM_CLASSES):
    """A torchvision ResNet with the replaced fc, loaded strictly from a plain state_dict."""
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _image_tiles(path, tile, size):
    """The non-overlapping ``tile`` squares of an image (row-major, border dropped), resized to ``size``."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        return [np.asarray(im.crop((x * tile, y * tile, (x + 1) * tile, (y + 1) * tile)).resize((size, size), Image.BILINEAR))
                for y in range(h // tile) for x in range(w // tile)]


@torch.no_grad()
def _predict(model, tiles):
    """Sigmoid probabilities of uint8 HxWx3 tiles, normalised with config.MEAN/STD as in training."""
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(config.MEAN).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(config.STD).view(1, -1, 1, 1) * 255.0
    return torch.sigmoid(model((x - mean) / std))


def _running_best_epochs(records):
    """For each watched val metric, the epoch of its (strictly improving) best value so far."""
    best, where = {}, {}
    for record in sorted(records, key=lambda r: r["epoch"]):
        for key in BEST_FILE_SUFFIX:
            value = record["val_results"][key]
            if value is not None and (key not in best or value > best[key]):
                best[key], where[key] = value, record["epoch"]
    return best, where


# ----------------------------------------------------------------------- module-scoped runs

@pytest.fixture(scope="module")
def module_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_runs")


@pytest.fixture(scope="module")
def full_run(tiny_ana_master, module_dirs):
    """One 2-epoch run of the full model with --saveModel, shared by the output-file tests."""
    run_dir = module_dirs / "full"
    result = main.main(cpu_argv(tiny_ana_master, run_dir, module_dirs / "cache",
                                 "--saveModel", *FULL_MODEL, "--epoch", "2"))
    records = json.loads((run_dir / "results.json").read_text())
    return {"result": result, "run_dir": run_dir, "data": tiny_ana_master, "records": records,
            "args": json.loads((run_dir / "args.json").read_text())}


@pytest.fixture(scope="module")
def existing_run(tiny_ana_master, module_dirs):
    """A finished 1-epoch run (default flags): the 'something already written' of the error tests."""
    run_dir = module_dirs / "existing"
    result = main.main(cpu_argv(tiny_ana_master, run_dir, module_dirs / "cache", "--epoch", "1"))
    return {"run_dir": run_dir, "result": result}


# --------------------------------------------------------------- 1. outputs of the full model

def test_full_run_returns_metrics_and_run_dir(full_run):
    result, records = full_run["result"], full_run["records"]
    assert set(result) >= {"best", "val", "test", "run_dir"}
    assert Path(result["run_dir"]) == full_run["run_dir"]
    best, _ = _running_best_epochs(records)
    assert result["best"] == pytest.approx(best)
    # the returned test metrics are those of the latest new best, as recorded
    for key in METRIC_KEYS:
        assert result["test"][key] == pytest.approx(records[-1]["test_results"][key])


def test_full_run_output_txt_logs_both_epochs(full_run):
    text = (full_run["run_dir"] / "output.txt").read_text()
    val_by_epoch = {r["epoch"]: r["val_results"] for r in full_run["records"]}
    val_by_epoch.setdefault(2, full_run["result"]["val"])  # the last epoch's val metrics are returned
    for epoch in (1, 2):
        lines = [line for line in text.splitlines() if re.search(rf"\bepoch {epoch}\b", line) and "val" in line]
        assert lines, f"no val line for epoch {epoch} in output.txt"
        numbers = [f"{val_by_epoch[epoch][k]:.4f}" for k in ("f1_mi", "f1_ma", "mAP")]
        assert any(all(n in line for n in numbers) for line in lines), (numbers, lines)
    assert "new best" in text
    assert not re.search(r"\berror: ", text) and "Traceback" not in text


def test_full_run_results_json_records(full_run):
    records = full_run["records"]  # json.loads worked in the fixture
    assert isinstance(records, list) and records
    epochs = [r["epoch"] for r in records]
    assert epochs == sorted(set(epochs)) and set(epochs) <= {1, 2}
    assert epochs[0] == 1  # the first epoch always sets a new best
    for i, record in enumerate(records[1:], start=1):  # one record per epoch that set a new best
        assert any(record["val_results"][k] > max(r["val_results"][k] for r in records[:i])
                   for k in BEST_FILE_SUFFIX), f"epoch {record['epoch']} improved no val metric"
    for record in records:
        for part in ("val_results", "test_results"):
            metrics = record[part]
            for key in METRIC_KEYS:
                assert isinstance(metrics[key], float), (part, key, metrics[key])
            for key in ("acc_total", "f1_mi", "f1_ma", "mAP", "hamming_loss", "one_error", "ranking_loss"):
                assert 0.0 <= metrics[key] <= 1.0, (part, key)
            assert 0.0 <= metrics["coverage"] <= NUM_CLASSES
            assert len(metrics["per_class_acc"]) == NUM_CLASSES
            assert all(0.0 <= a <= 1.0 for a in metrics["per_class_acc"])


def test_full_run_test_predictions_are_the_max_over_tiles(full_run):
    run_dir, data, args = full_run["run_dir"], full_run["data"], full_run["args"]
    ann = _read_csv(data / "annotations.csv")
    test_rows = ann[ann["Split"] == "test"].reset_index(drop=True)
    pred = _read_csv(run_dir / "test_predictions.csv")
    prob_cols = [f"prob_{k}" for k in range(NUM_CLASSES)]
    assert list(pred.columns) == ["path", "target"] + prob_cols
    # one row per test image, same paths, target = the CSV's TARGET string
    assert len(pred) == len(test_rows) and set(pred["path"]) == set(test_rows["path"])
    pred = pred.set_index("path").loc[test_rows["path"]]
    assert list(pred["target"]) == list(test_rows["TARGET"])
    csv_probs = pred[prob_cols].astype(float).to_numpy()
    assert ((csv_probs >= 0) & (csv_probs <= 1)).all()

    # Recompute: the predictions belong to the latest new best; its weights are in {epoch}_*.pt.
    latest = full_run["records"][-1]
    checkpoints = sorted(run_dir.glob(f"{latest['epoch']}_*.pt"))
    assert checkpoints, f"no best-model file of epoch {latest['epoch']}"
    model = _resnet(torch.load(checkpoints[0], map_location="cpu", weights_only=True), args["arch"])
    tiles = [_image_tiles(data / "images" / p, args["tileSize"], args["imageSize"]) for p in test_rows["path"]]
    assert all(len(t) == len(tiles[0]) > 1 for t in tiles)  # several tiles per image, or max means nothing
    tile_probs = _predict(model, [t for image in tiles for t in image]).view(len(tiles), len(tiles[0]), -1)
    bag_probs = tile_probs.amax(dim=1).numpy()
    np.testing.assert_allclose(csv_probs, bag_probs, atol=1e-5)
    # ... and not the mean (the tiles of an image disagree somewhere)
    assert np.abs(tile_probs.mean(dim=1).numpy() - bag_probs).max() > 1e-3

    # The recorded test metrics follow from these bag probabilities.
    y_true = _multi_hot(test_rows["TARGET"])
    recomputed = multilabel_metrics(y_true, bag_probs)
    from_csv = multilabel_metrics(y_true, csv_probs)
    for key in METRIC_KEYS:
        assert latest["test_results"][key] == pytest.approx(recomputed[key], abs=1e-6), key
    for key in ("acc_total", "f1_mi", "f1_ma", "hamming_loss"):
        assert latest["test_results"][key] == pytest.approx(from_csv[key], abs=1e-6), key
    assert latest["test_results"]["per_class_acc"] == pytest.approx(recomputed["per_class_acc"])


def test_full_run_test_tile_predictions(full_run):
    # per test tile: its image, index (row-major), box corner and the latest best model's probabilities
    run_dir, data, args = full_run["run_dir"], full_run["data"], full_run["args"]
    ann = _read_csv(data / "annotations.csv")
    test_rows = ann[ann["Split"] == "test"].reset_index(drop=True)
    tiles = pd.read_csv(run_dir / "test_tile_predictions.csv")
    prob_cols = [f"prob_{k}" for k in range(NUM_CLASSES)]
    assert list(tiles.columns) == ["path", "tile", "left", "top"] + prob_cols
    latest = full_run["records"][-1]
    model = _resnet(torch.load(sorted(run_dir.glob(f"{latest['epoch']}_*.pt"))[0], map_location="cpu",
                               weights_only=True), args["arch"])
    size = args["tileSize"]
    for path in test_rows["path"]:
        rows = tiles[tiles["path"] == path]
        with Image.open(data / "images" / path) as im:
            nx, ny = im.width // size, im.height // size
        assert list(rows["tile"]) == list(range(nx * ny))
        assert list(rows["left"]) == [(t % nx) * size for t in range(nx * ny)]
        assert list(rows["top"]) == [(t // nx) * size for t in range(nx * ny)]
        expected = _predict(model, _image_tiles(data / "images" / path, size, args["imageSize"])).numpy()
        np.testing.assert_allclose(rows[prob_cols].to_numpy(), expected, atol=1e-5)
    # the image-level predictions are their max over the tiles
    bag = tiles.groupby("path", sort=False)[prob_cols].max()
    pred = pd.read_csv(run_dir / "test_predictions.csv").set_index("path")
    np.testing.assert_allclose(bag.loc[pred.index].to_numpy(), pred[prob_cols].to_numpy(), atol=1e-6)


def _planned_tiles(args):
    """The tiles main.py plans for the run whose args.json holds ``args``."""
    settings = main.resolve_settings(argparse.Namespace(**args), config)
    return main.load_data(settings, logging.getLogger("test_main_cli"))[0]


def test_full_run_instance_weights(full_run):
    # one row per positive (training tile, class) pair: the weight in use, the image's labels, the last target
    run_dir, data, args = full_run["run_dir"], full_run["data"], full_run["args"]
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    tiles = _planned_tiles(args)
    train = tiles["train"]
    frame = pd.read_csv(run_dir / "instance_weights_last.csv", dtype={"bag_labels": str})
    assert list(frame.columns) == ["path", "tile", "left", "top", "class", "weight", "bag_labels", "target"]
    frame = frame.rename(columns={"class": "cls"})
    labels = train.tile_labels > 0
    assert len(frame) == int(labels.sum())
    ann = _read_csv(data / "annotations.csv").set_index("path")
    size = args["tileSize"]
    index = {}
    for t, (path, box) in enumerate(zip(train.image_paths, train.boxes)):
        with Image.open(path) as im:
            nx = im.width // size
        index[(Path(path).name, int(box[1]) // size * nx + int(box[0]) // size)] = t
    for row in frame.itertuples():
        t = index[(row.path, row.tile)]  # (image, tile index) names one training tile ...
        assert (row.left, row.top) == tuple(int(v) for v in train.boxes[t][:2])  # ... at this position
        assert labels[t, row.cls] and row.bag_labels == ann.loc[row.path, "TARGET"]
        assert row.weight == pytest.approx(max(float(state["weights"]["alpha"][t, row.cls]), 0.0), abs=1e-6)
        assert row.target == float(state["targets"][t, row.cls])
    assert frame["weight"].nunique() > 1  # the full model's weights moved apart
    # the same at the latest improvement, and one PNG per class of the multi-label images
    best = pd.read_csv(run_dir / "instance_weights.csv", dtype={"bag_labels": str})
    assert best[["path", "tile", "class"]].equals(frame[["path", "tile", "cls"]].rename(columns={"cls": "class"}))
    multi_classes = set(frame.loc[frame["bag_labels"].str.split().map(len) > 1, "cls"])
    for suffix in ("", "_last"):
        pngs = {p.name for p in (run_dir / "instance_tiles").glob("class*.png") if p.stem.endswith("_last") == bool(suffix)}
        assert pngs == {f"class{c}{suffix}.png" for c in multi_classes}
    with Image.open(run_dir / "instance_tiles" / f"class{min(multi_classes)}_last.png") as im:
        assert im.height > 2 * args["imageSize"]  # two rows of tiles


def test_full_run_best_model_files(full_run):
    run_dir, args = full_run["run_dir"], full_run["args"]
    _, best_epoch = _running_best_epochs(full_run["records"])
    expected = {f"{best_epoch[key]}_{suffix}.pt" for key, suffix in BEST_FILE_SUFFIX.items()}
    found = {p.name for p in run_dir.glob("*.pt")} - {"last.pt"}
    assert found == expected  # one file per metric; superseded ones are deleted
    for name in sorted(expected):
        state = torch.load(run_dir / name, map_location="cpu", weights_only=True)
        _resnet(state, args["arch"])  # plain state_dict, strict load into torchvision's resnet


def test_full_run_last_checkpoint(full_run):
    run_dir, args, data = full_run["run_dir"], full_run["args"], full_run["data"]
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    model = _resnet(state["model"], args["arch"])
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(state["optimizer"])
    # ulr-adaptive: the network's Adam restarts after every epoch, as the reference rebuilt it
    assert not optimizer.state, "the network's Adam state was not reset after the ulr-adaptive epoch"
    assert isinstance(state["early_stopping"], dict) and state["rng_state"] and "rng" not in state

    # Training tiles: every train image gives (w // tile) * (h // tile) tiles with its labels.
    ann = _read_csv(data / "annotations.csv")
    train = ann[ann["Split"] == "train"]
    per_image = []
    for path in train["path"]:
        with Image.open(data / "images" / path) as im:
            per_image.append((im.width // args["tileSize"]) * (im.height // args["tileSize"]))
    n_tiles = sum(per_image)
    alpha, targets = state["weights"]["alpha"], state["targets"]
    assert alpha.shape == (n_tiles, NUM_CLASSES)
    assert targets.shape == (n_tiles, NUM_CLASSES)

    # The tile order is the one the code plans; check it against the CSV, then the weights.
    tiles = _planned_tiles(args)
    tile_labels = tiles["train"].tile_labels
    expected = np.repeat(_multi_hot(train["TARGET"]), per_image, axis=0)
    assert sorted(map(tuple, tile_labels.int().tolist())) == sorted(map(tuple, expected.tolist()))
    assert set(targets.unique().tolist()) <= {0.0, 1.0}
    assert (targets <= tile_labels).all(), "a pseudo-label outside the bag's labels"
    init = tile_labels / tile_labels.sum(dim=1, keepdim=True)  # iw-sample: 1/|y| on each positive class
    assert (alpha[tile_labels == 0] == 0).all(), "weights of negative classes must stay 0"
    assert (alpha <= init + 1e-6).all(), "weights only shrink (d loss / d alpha = BCE >= 0)"
    single = tile_labels.sum(dim=1) == 1  # ulr-adaptive: log(1) = 0, so these never move
    assert single.any() and torch.equal(alpha[single], init[single])
    assert (alpha[~single] < init[~single] - 1e-6).any(), "no multi-label weight was learned"


def test_full_run_tensorboard_events(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, records = full_run["run_dir"], full_run["records"]
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "val/f1_mi", "val/mAP", "test/f1_mi", "weights/mean", "weights/dropped_fraction",
                "sampler/entropy"):
        assert tag in tags, tag

    def steps(tag):
        return [e.step for e in events.Scalars(tag)]

    for tag in ("train/loss", "val/f1_mi", "weights/mean", "sampler/entropy"):
        assert steps(tag) == [1, 2], tag
    assert steps("test/f1_mi") == [r["epoch"] for r in records]  # tested on each new best
    val = {e.step: e.value for e in events.Scalars("val/f1_mi")}
    test = {e.step: e.value for e in events.Scalars("test/f1_mi")}
    for record in records:
        assert val[record["epoch"]] == pytest.approx(record["val_results"]["f1_mi"], abs=1e-6)
        assert test[record["epoch"]] == pytest.approx(record["test_results"]["f1_mi"], abs=1e-6)
    assert all(0.0 < e.value <= 1.0 for e in events.Scalars("sampler/entropy"))
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("weights/dropped_fraction"))
    # the weights of the positive (tile, label) pairs, one histogram per epoch
    histograms = EventAccumulator(str(run_dir), size_guidance={"histograms": 0})  # 0: keep every epoch's
    histograms.Reload()
    assert [e.step for e in histograms.Histograms("weights/alpha")] == [1, 2]


def test_full_run_args_json(full_run):
    args = full_run["args"]
    assert args["epoch"] == 2 and args["saveModel"] is True and args["sampling"] is True
    assert (args["initWeight"], args["updateLR"], args["granularity"], args["trainingLabel"]) == \
        ("iw-sample", "ulr-adaptive", "label", "pseudo")
    assert args["lr"] == 3e-4 and args["weight_lr"] == 1e-3 and args["weight_lr_used"] == 1e-3
    assert Path(args["pathModelParams"]) == full_run["run_dir"]
    # the settings that come from config.py, not from flags, are recorded too
    assert (args["config_module"], args["MEAN"], args["STD"], args["SINGLE_LABEL"]) == \
        ("config", list(config.MEAN), list(config.STD), False)


# ---------------------------------------------------------------------- 2. without --saveModel

def test_run_without_save_model_writes_log_and_results(ana_args, tmp_path):
    result = main.main(ana_args("--epoch", "1"))
    run_dir = tmp_path / "run"
    assert Path(result["run_dir"]) == run_dir
    assert "epoch 1" in (run_dir / "output.txt").read_text()
    records = json.loads((run_dir / "results.json").read_text())
    assert [r["epoch"] for r in records] == [1]
    assert (run_dir / "test_predictions.csv").is_file()
    assert not [p.name for p in run_dir.glob("*.pt") if p.name != "last.pt"]  # no best-model files


# ------------------------------------------------------------------------------- 3. resuming

def test_resume_continues_exactly(ana_args, tmp_path):
    straight = main.main(ana_args("--saveModel", *FULL_MODEL, "--epoch", "2", run="A"))
    main.main(ana_args("--saveModel", *FULL_MODEL, "--epoch", "1", run="B"))
    log_before = (tmp_path / "B" / "output.txt").read_text()
    resumed = main.main(ana_args("--saveModel", *FULL_MODEL, "--epoch", "2", "--loadModel", run="B"))
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"

    log = (b_dir / "output.txt").read_text()
    assert log.startswith(log_before)  # appended, not rewritten
    assert re.search(r"resum\w*\b.*\bepoch 2\b", log[len(log_before):]), "output.txt does not say it resumed at epoch 2"

    a = torch.load(a_dir / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(b_dir / "last.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    # Exact on CPU in practice (RNG state, sampler epoch seeds and optimiser state are all restored).
    assert torch.allclose(a["weights"]["alpha"], b["weights"]["alpha"], atol=1e-5, rtol=0)
    assert torch.equal(a["targets"], b["targets"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-5, rtol=0), key

    records_a = json.loads((a_dir / "results.json").read_text())
    records_b = json.loads((b_dir / "results.json").read_text())
    epochs_b = [r["epoch"] for r in records_b]
    assert len(epochs_b) == len(set(epochs_b))
    assert epochs_b == [r["epoch"] for r in records_a]
    for ra, rb in zip(records_a, records_b):
        for part in ("val_results", "test_results"):
            for key in METRIC_KEYS:
                assert ra[part][key] == pytest.approx(rb[part][key], abs=1e-6), (ra["epoch"], part, key)
    # best-model files: the resumed run supersedes (deletes) the files of the first invocation alike
    assert {p.name for p in a_dir.glob("*.pt")} == {p.name for p in b_dir.glob("*.pt")}
    pd.testing.assert_frame_equal(pd.read_csv(a_dir / "test_predictions.csv"),
                                  pd.read_csv(b_dir / "test_predictions.csv"), atol=1e-5)
    assert resumed["best"] == pytest.approx(straight["best"])
    for key in METRIC_KEYS:
        assert resumed["val"][key] == pytest.approx(straight["val"][key], abs=1e-6), key


def test_resume_reads_the_random_state_of_an_older_checkpoint(ana_args, tmp_path):
    # last.pt files written before the key was renamed hold the random state under "rng"
    main.main(ana_args(*FULL_MODEL, "--epoch", "2", run="A"))
    main.main(ana_args(*FULL_MODEL, "--epoch", "1", run="B"))
    state = torch.load(tmp_path / "B" / "last.pt", map_location="cpu", weights_only=True)
    state = {("rng" if key == "rng_state" else key): value for key, value in state.items()}
    save_checkpoint(state, tmp_path / "B" / "last.pt")
    main.main(ana_args(*FULL_MODEL, "--epoch", "2", "--loadModel", run="B"))
    a = torch.load(tmp_path / "A" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "B" / "last.pt", map_location="cpu", weights_only=True)
    assert b["epoch"] == 2 and "rng_state" in b and "rng" not in b
    assert torch.equal(a["targets"], b["targets"]) and torch.equal(a["sampler_weights"], b["sampler_weights"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resume_keeps_the_weights_optimiser_state(ana_args, tmp_path):
    # ulr-ones never restarts the weights' Adam, so its moments and per-group step counts carry
    # over the epoch boundary: a resume must restore them from last.pt to end where an
    # uninterrupted run ends
    flags = ("--sampling", "--trainingLabel", "pseudo", "--updateLR", "ulr-ones", "--weight_lr", "0.05")
    main.main(ana_args(*flags, "--epoch", "2", run="A"))
    main.main(ana_args(*flags, "--epoch", "1", run="B"))
    main.main(ana_args(*flags, "--epoch", "2", "--loadModel", run="B"))
    a = torch.load(tmp_path / "A" / "last.pt", map_location="cpu", weights_only=True)["weights"]
    b = torch.load(tmp_path / "B" / "last.pt", map_location="cpu", weights_only=True)["weights"]
    assert torch.equal(a["steps"], b["steps"]) and a["steps"].min() > 0
    for key in ("alpha", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_with_sgd_weights_continues_exactly(ana_args, tmp_path, capsys):
    flags = (*FULL_MODEL, "--weightOptimizer", "sgd", "--weight_lr", "0.05")
    main.main(ana_args(*flags, "--epoch", "3", run="A"))
    main.main(ana_args(*flags, "--epoch", "1", run="B"))
    main.main(ana_args(*flags, "--epoch", "3", "--loadModel", run="B"))
    a = torch.load(tmp_path / "A" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "B" / "last.pt", map_location="cpu", weights_only=True)
    assert a["weights"]["optimizer"] == b["weights"]["optimizer"] == "sgd"
    assert torch.equal(a["targets"], b["targets"]) and torch.equal(a["weights"]["steps"], b["weights"]["steps"])
    torch.testing.assert_close(a["weights"]["alpha"], b["weights"]["alpha"], rtol=0, atol=1e-6)
    assert (a["weights"]["alpha"] != 0).any()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key].float(), b["model"][key].float(), rtol=0, atol=1e-5)
    # a resume with the other weight optimiser is refused by name
    lines = _expect_user_error(capsys, ana_args(*FULL_MODEL, "--epoch", "4", "--loadModel", run="B"))
    _assert_mid_run_error(lines, "--weightOptimizer sgd")


def test_sgd_weight_lr_default_only_when_none_is_given(ana_args, tmp_path):
    main.main(ana_args("--weightOptimizer", "sgd", "--epoch", "1", run="A"))
    main.main(ana_args("--weightOptimizer", "sgd", "--weight_lr", "0.2", "--epoch", "1", run="B"))
    main.main(ana_args("--epoch", "1", run="C"))
    used = [json.loads((tmp_path / r / "args.json").read_text())["weight_lr_used"] for r in "ABC"]
    assert used == [config.SGD_WEIGHT_LR, 0.2, config.WEIGHT_LR]
    assert "the --weightOptimizer sgd default" in (tmp_path / "A" / "output.txt").read_text()


def test_resume_of_a_finished_run_changes_nothing(ana_args, existing_run, tmp_path):
    run_dir = tmp_path / "run"
    _link_copy(existing_run["run_dir"], run_dir)
    before = _snapshot(run_dir)
    log_before = (run_dir / "output.txt").read_text()
    main.main(ana_args("--loadModel", "--epoch", "1"))
    after = _snapshot(run_dir)
    for name in ("results.json", "last.pt", "test_predictions.csv"):
        assert after[name] == before[name], name
    assert (run_dir / "output.txt").read_text().startswith(log_before)


def test_resume_of_a_finished_run_returns_its_final_metrics(ana_args, existing_run, tmp_path):
    _link_copy(existing_run["run_dir"], tmp_path / "run")
    result = main.main(ana_args("--loadModel", "--epoch", "1"))
    assert result["best"] == pytest.approx(existing_run["result"]["best"])
    for key in METRIC_KEYS:
        assert result["test"].get(key) == pytest.approx(existing_run["result"]["test"][key]), key


def test_resume_drops_results_newer_than_the_checkpoint(ana_args, existing_run, tmp_path):
    # As after a crash between writing results.json and last.pt: results.json holds an epoch
    # that last.pt does not. The resumed run redoes that epoch and must not list it twice.
    run_dir = tmp_path / "run"
    _link_copy(existing_run["run_dir"], run_dir)
    records = json.loads((run_dir / "results.json").read_text())
    stale = dict(records[-1], epoch=2, stale_marker=True)
    (run_dir / "results.json").write_text(json.dumps(records + [stale]))
    main.main(ana_args("--loadModel", "--epoch", "2"))
    records = json.loads((run_dir / "results.json").read_text())
    epochs = [r["epoch"] for r in records]
    assert len(epochs) == len(set(epochs)) and epochs[0] == 1
    assert not any(r.get("stale_marker") for r in records)


def test_load_model_without_checkpoint_is_a_user_error(ana_args, tmp_path, capsys):
    lines = _expect_user_error(capsys, ana_args("--loadModel", "--epoch", "1", run="empty"))
    _assert_single_error_line(lines, "--loadModel", "last.pt", str(tmp_path / "empty"))
    assert not (tmp_path / "empty" / "results.json").exists()


def test_new_run_refuses_a_directory_holding_a_run(ana_args, existing_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _link_copy(existing_run["run_dir"], run_dir)
    before = _snapshot(run_dir)
    lines = _expect_user_error(capsys, ana_args("--epoch", "1"))
    _assert_single_error_line(lines, str(run_dir), "--loadModel")
    assert _snapshot(run_dir) == before  # results.json, last.pt, output.txt, ... byte for byte


# ------------------------------------------------------------------------------ 4. bad input

def _edit_csv(data, edit):
    path = data / "annotations.csv"
    df = _read_csv(path)
    df = edit(df)
    df.to_csv(path, index=False)
    return df


def _first_image(data, split):
    df = _read_csv(data / "annotations.csv")
    return df.loc[df["Split"] == split, "path"].iloc[0]


def _set_target(row, value):
    def edit(df):
        df.loc[row, "TARGET"] = value
        return df
    return edit


def _missing_annotation_file(data):
    return ["--annFile", str(data / "no_such_annotations.csv")], ["no_such_annotations.csv"]


def _no_split_column(data):
    _edit_csv(data, lambda df: df.drop(columns=["Split"]))
    return [], ["annotations.csv", re.compile(r"""['"]Split['"]""")]


def _no_target_column(data):
    _edit_csv(data, lambda df: df.drop(columns=["TARGET"]))
    return [], ["annotations.csv", re.compile(r"""['"]TARGET['"]""")]


def _no_test_rows(data):
    _edit_csv(data, lambda df: df[df["Split"] != "test"])
    return [], ["annotations.csv", re.compile(r"""['"]test['"]""")]


def _unparsable_target(data):
    _edit_csv(data, _set_target(2, "a b"))
    return [], ["annotations.csv:4", "a b"]  # data row 3 = line 4 of the file


def _target_out_of_range(data):
    _edit_csv(data, _set_target(0, "1 9"))
    return [], ["annotations.csv:2", "1 9"]


def _missing_image(data):
    name = _first_image(data, "test")
    (data / "images" / name).unlink()
    return [], [name]


def _unreadable_image(data):
    name = _first_image(data, "train")
    (data / "images" / name).write_bytes(b"this is not a PNG file\n" * 20)
    return [], [name]


def _image_smaller_than_a_tile(data):
    name = _first_image(data, "val")
    Image.new("RGB", (64, 64)).save(data / "images" / name)
    return [], [name, "64x64"]


def _empty_csv(data):
    (data / "annotations.csv").write_text("")
    return [], ["annotations.csv"]


def _malformed_csv(data):
    with open(data / "annotations.csv", "a") as f:
        f.write("extra.png,1,train,1,surplus,fields\n")
    return [], ["annotations.csv"]


def _zero_epochs(data):
    return ["--epoch", "0"], ["--epoch"]


def _negative_lr(data):
    return ["--lr", "-1"], ["--lr"]


def _unknown_device(data):
    return ["--device", "nonsense"], ["nonsense"]


BAD_INPUTS = [
    pytest.param(_missing_annotation_file, id="missing-annotation-file"),
    pytest.param(_no_split_column, id="no-Split-column"),
    pytest.param(_no_target_column, id="no-TARGET-column"),
    pytest.param(_no_test_rows, id="empty-test-split"),
    pytest.param(_unparsable_target, id="unparsable-TARGET"),
    pytest.param(_target_out_of_range, id="TARGET-out-of-range"),
    pytest.param(_missing_image, id="missing-image"),
    pytest.param(_unreadable_image, id="unreadable-image"),
    pytest.param(_image_smaller_than_a_tile, id="image-smaller-than-tile"),
    pytest.param(_empty_csv, id="empty-csv"),
    pytest.param(_malformed_csv, id="malformed-csv"),
    pytest.param(_zero_epochs, id="epoch-0"),
    pytest.param(_negative_lr, id="negative-lr"),
    pytest.param(_unknown_device, id="unknown-device"),
]


@pytest.mark.parametrize("mode", ["new-run", "resume"])
@pytest.mark.parametrize("prepare", BAD_INPUTS)
def test_bad_input_is_one_error_line(prepare, mode, tiny_ana, ana_args, existing_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    extra = ["--epoch", "1"]
    if mode == "resume":  # something already written, which must survive
        _link_copy(existing_run["run_dir"], run_dir)
        extra = ["--loadModel", "--epoch", "2"]
    before = _snapshot(run_dir) if run_dir.exists() else {}
    bad_args, culprits = prepare(tiny_ana)
    lines = _expect_user_error(capsys, ana_args(*extra, *bad_args))
    _assert_single_error_line(lines, *culprits)
    if mode == "resume":
        assert _snapshot(run_dir) == before
    else:  # a failed start must not leave a "run" behind that blocks the corrected command
        assert not (run_dir / "results.json").exists() and not (run_dir / "last.pt").exists()


def _assert_mid_run_error(lines, *culprits):
    """Errors after the run started: the log lines precede it on stderr; the error is the last line."""
    assert lines and lines[-1].startswith("error: "), lines
    _assert_names(lines[-1], culprits)


def test_truncated_image_fails_while_caching_and_keeps_the_run(tiny_ana, ana_args, existing_run, tmp_path, capsys):
    # The PNG header is intact (size checks pass), the pixel data is cut: decoding fails, and it is
    # found before the run directory changes (the tiles are cached before the run's log is opened).
    run_dir = tmp_path / "run"
    _link_copy(existing_run["run_dir"], run_dir)
    before = _snapshot(run_dir)
    name = _first_image(tiny_ana, "test")
    path = tiny_ana / "images" / name
    path.write_bytes(path.read_bytes()[:2000])
    lines = _expect_user_error(capsys, ana_args("--loadModel", "--epoch", "2"))
    _assert_mid_run_error(lines, name)
    assert _snapshot(run_dir) == before  # output.txt, args.json, last.pt, no new events file
    assert not [p.name for p in (tmp_path / "cache").iterdir() if "tmp" in p.name]  # no half-written cache


def test_all_weights_dropped_to_zero_is_a_user_error_with_sampling(ana_args, tmp_path, capsys):
    # Each tile is drawn once in epoch 1 (shuffled, no sampler); Adam's first step moves a weight by
    # about weight_lr whatever the size of its gradient (BCE > 0), so every weight goes from 1 to
    # about -999. Resumed with --sampling, the sampler of epoch 2 has nothing to draw.
    run_dir = tmp_path / "run"
    flags = ("--weight_lr", "1000", "--granularity", "sample")
    main.main(ana_args(*flags, "--epoch", "1"))
    lines = _expect_user_error(capsys, ana_args(*flags, "--epoch", "2", "--sampling", "--loadModel"))
    _assert_mid_run_error(lines, "every instance weight has dropped to zero", "--sampling", "--weight_lr")
    log = (run_dir / "output.txt").read_text()
    assert lines[-1] in log
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert (state["weights"]["alpha"] <= 0).all()
    assert [r["epoch"] for r in json.loads((run_dir / "results.json").read_text())] == [1]


def test_all_weights_zero_without_sampling_warns_once_and_trains_on(ana_args, tmp_path):
    # as the reference, which needed the weights only to draw tiles: the loss keeps its negative labels
    run_dir = tmp_path / "run"
    main.main(ana_args("--weight_lr", "1000", "--granularity", "sample", "--epoch", "3", "--patience", "0"))
    log = (run_dir / "output.txt").read_text()
    assert log.count("every instance weight is zero") == 1
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3 and (state["weights"]["alpha"] <= 0).all()


def test_missing_pretrained_weights_fails_and_the_corrected_command_runs(ana_args, tmp_path, capsys):
    missing = tmp_path / "no_such_weights.pth"
    lines = _expect_user_error(capsys, ana_args("--epoch", "1", "--pretrained", "--pretrainedWeights", str(missing)))
    _assert_mid_run_error(lines, str(missing))
    assert not (tmp_path / "run").exists()  # failed before writing anything: no empty run directory
    assert main.main(ana_args("--epoch", "1"))["best"]  # the failed start did not "hold" the directory


def test_mid_run_error_is_printed_once(ana_args, tmp_path, capsys):
    lines = _expect_user_error(capsys, ana_args("--epoch", "1", "--pretrained", "--pretrainedWeights",
                                                str(tmp_path / "no_such_weights.pth")))
    assert len([line for line in lines if line.startswith("error: ")]) == 1, lines


def test_negative_num_workers_is_a_user_error(ana_args, capsys):
    lines = _expect_user_error(capsys, ana_args("--epoch", "1", "--numWorkers", "-1"))
    _assert_mid_run_error(lines, "--numWorkers")


def test_negative_weight_decay_is_a_user_error(ana_args, capsys):
    lines = _expect_user_error(capsys, ana_args("--epoch", "1", "--weightDecay", "-1"))
    _assert_mid_run_error(lines, "--weightDecay")


def test_run_dir_that_is_a_file_is_a_user_error(tiny_ana, ana_args, capsys):
    target = tiny_ana / "annotations.csv"
    lines = _expect_user_error(capsys, ana_args("--epoch", "1", "--pathModelParams", str(target)))
    _assert_single_error_line(lines, str(target))


@pytest.mark.parametrize("flag,value", [("--initWeight", "iw-foo"), ("--updateLR", "ulr-foo"),
                                        ("--granularity", "pixel"), ("--trainingLabel", "fuzzy"),
                                        ("--arch", "vgg16"), ("--epoch", "two")])
def test_argparse_rejects_invalid_values(flag, value, ana_args, capsys):
    lines = _expect_user_error(capsys, ana_args(flag, value))
    assert "error:" in lines[-1] and flag in lines[-1] and value in lines[-1], lines


# ------------------------------------------------------------------------ 5. argument parsing

def test_parser_defaults():
    args = main.build_parser().parse_args([])
    # the defaults of the documented CLI (the reference code's README)
    assert args.lr == 5e-3 and args.weight_lr == 5e-3
    assert args.epoch == 200 and args.trainBatchSize == 32 and args.testBatchSize == 32
    # the reference rebuilt the network's Adam with the weights' after every ulr-adaptive epoch
    assert args.weightOptimizer == "adam" and args.resetOptimizer is True
    assert args.saveModel is False and args.loadModel is False
    assert (args.initWeight, args.updateLR, args.trainingLabel, args.granularity) == \
        ("iw-ones", "ulr-ones", "real", "label")
    assert args.sampling is False
    # ours
    assert (args.arch, args.imageSize, args.tileSize) == ("resnet50", 224, 448)
    assert args.pretrained is True and args.seed == 42 and args.device == "auto"


def test_parser_boolean_flags():
    parse = main.build_parser().parse_args
    assert parse(["--no-pretrained"]).pretrained is False
    assert parse(["--pretrained"]).pretrained is True
    assert parse(["--sampling"]).sampling is True
    assert parse(["--sampling", "--no-sampling"]).sampling is False
    assert parse(["--saveModel", "--loadModel"]).saveModel is True


def test_help_mentions_the_data_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--annFile", "--imageDir", "--tileSize", "--bagColumn", "--pathModelParams"):
        assert flag in out, flag


# ---------------------------------------------------------------------- 6. a pre-tiled CSV

def test_pretiled_csv_gives_one_prediction_per_bag(tiny_ana, ana_args, tmp_path):
    tile = 128
    ann = _read_csv(tiny_ana / "annotations.csv")
    (tiny_ana / "tiles").mkdir()
    rows = []
    for _, row in ann.iterrows():
        stem = Path(row["path"]).stem
        for i, array in enumerate(_image_tiles(tiny_ana / "images" / row["path"], tile, tile)):  # crops, no resize
            name = f"tiles/{stem}_t{i}.png"
            Image.fromarray(array).save(tiny_ana / name)
            rows.append({"path": name, "TARGET": row["TARGET"], "Split": row["Split"], "bag": f"slide-{stem}"})
    tiles = pd.DataFrame(rows)
    tiles = tiles.iloc[np.random.default_rng(0).permutation(len(tiles))]  # a bag's rows need not be adjacent
    tiles.to_csv(tiny_ana / "tiles.csv", index=False)

    main.main(ana_args("--annFile", str(tiny_ana / "tiles.csv"), "--imageDir", str(tiny_ana), "--bagColumn", "bag",
                       "--epoch", "1", "--lr", "1e-3"))
    run_dir = tmp_path / "run"
    pred = _read_csv(run_dir / "test_predictions.csv")
    test_tiles = tiles[tiles["Split"] == "test"]
    bags = test_tiles.groupby("bag")
    assert len(pred) == bags.ngroups and set(pred["path"]) == set(bags.groups)
    args = json.loads((run_dir / "args.json").read_text())
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert [r["epoch"] for r in json.loads((run_dir / "results.json").read_text())] == [1]
    model = _resnet(state["model"], args["arch"])  # epoch 1 is the only (new best) epoch
    for _, row in pred.iterrows():
        members = bags.get_group(row["path"])
        assert row["target"] == members["TARGET"].iloc[0]
        arrays = []
        for path in members["path"]:
            with Image.open(tiny_ana / path) as im:
                arrays.append(np.asarray(im.convert("RGB").resize((args["imageSize"],) * 2, Image.BILINEAR)))
        expected = _predict(model, arrays).amax(dim=0).numpy()
        got = np.array([float(row[f"prob_{k}"]) for k in range(NUM_CLASSES)])
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_load_model_recovers_a_run_that_died_in_its_first_epoch(ana_args, tmp_path):
    """results.json written but no last.pt yet: --loadModel starts over at epoch 1 (no dead end)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps([{"epoch": 1, "val_results": {}, "test_results": {}}]))
    (run_dir / "args.json").write_text('{"original": true}')
    main.main(ana_args("--epoch", "1", "--loadModel"))
    records = json.loads((run_dir / "results.json").read_text())
    assert [r["epoch"] for r in records] == [1] and records[0]["val_results"]  # the stale record was replaced
    assert "starting at epoch 1" in (run_dir / "output.txt").read_text()
    assert json.loads((run_dir / "args.json").read_text()) == {"original": True}  # a resume keeps args.json
