"""End-to-end tests of ``train_pu_selective_fixmatch.py``: tiny CPU runs through ``main([...])``.

What they pin down (README, CryoEM "Run" and "Outputs"):

- every output file of a 2-epoch run with all four loss terms active in epoch 2:
  ``config.yaml`` (with the command-line overrides), ``train.log`` (header and one line per
  epoch), ``best_model.pt`` / ``last.pt`` (keys, strict loads, weights_only), ``results.json``
  (test metrics recomputed here from the saved teacher), the TensorBoard scalars;
- ``--resume`` after an interruption continues exactly (same weights and metrics as an
  uninterrupted run), extends a finished run to more epochs, and a finished run resumed
  changes nothing; a run directory is never reused by accident;
- a non-finite loss stops with one error line naming epoch and step, and last.pt stays;
- every bad input ends with exit code 2, one ``error: ...`` line naming the culprit, no
  traceback, and an existing run directory untouched;
- ``selective: false`` (standard FixMatch) runs.

Data: 40 positives + 160 unlabelled 32 px patches, 40 val + 40 test (generate_cryoem_demo);
resnet18, batch 16, CPU, no workers.
"""
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import train_pu_selective_fixmatch as entry
import utils.cryoem.epoch as cryo_epoch
from conftest import expect_exit_2
from datasets.cryoem_dataset_pu import load_pu_data
from datasets.synthetic_cryoem import generate_cryoem_demo
from models.fixmatch_pu import EMATeacher, FixMatchPUModel
from utils.cryoem.config import load_config, value_at
from utils.cryoem.prior import prior_mismatch
from utils.metrics import binary_metrics

# Every loss term is active in the second epoch (0-based epoch index 1): consistency ramp 1
# epoch, entropy from epoch index 0 over 1 epoch. A low tau keeps the mask non-empty for an
# almost untrained teacher; a fast EMA lets the teacher follow the student within 2 epochs.
TINY_CONFIG = {
    "data": {"batch_ratio": [1, 4], "num_workers": 2},
    "loss": {"prior": 0.3, "consistency_threshold": 0.05, "lambda_consistency": 1.0, "lambda_entropy": 0.01,
             "selective": True},
    "model": {"backbone": "resnet18", "pretrained": False, "use_ema": True, "ema_decay": 0.9, "dropout": 0.2},
    "training": {"batch_size": 32, "epochs": 5, "learning_rate": 0.001, "rampup_epochs": 1,
                 "entropy_start_epoch": 0, "entropy_rampup_epochs": 1, "early_stopping_patience": 0,
                 "device": "auto"},
}
REQUIRED_TAGS = ("train/mask_rate", "train/pseudo_positive_rate", "train/consistency_loss", "train/entropy_loss",
                 "train/loss_pos", "train/loss_neg", "train/loss", "train/consistency_weight",
                 "train/entropy_weight", "train/lr", "train/nn_correction_rate", "val/auc", "val/ap", "val/f1",
                 "val/precision", "val/recall", "val/best_f1")
METRIC_KEYS = ("auc", "ap", "precision", "recall", "f1", "threshold", "best_f1", "best_f1_threshold")
BEST_KEYS = ("model", "student", "config", "epoch", "val_metrics", "backbone", "patch_size")
LAST_KEYS = ("epoch", "student", "teacher", "optimizer", "scheduler", "best_auc", "best_epoch",
             "early_stopping", "split", "rng_state", "config")


# ------------------------------------------------------------------------------------ helpers

def _write_config(path, **sections):
    """TINY_CONFIG with ``sections`` ({"loss": {"prior": 1.5}, ...}) merged in, written to ``path``."""
    cfg = json.loads(json.dumps(TINY_CONFIG))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _argv(config, data, out, *extra, exp="run", epochs=2):
    """CPU-sized argv; the overrides differ from the YAML on purpose (the CLI must win)."""
    return ["--config", str(config), "--data-dir", str(data), "--output-dir", str(out), "--exp-name", exp,
            "--batch-size", "16", "--epochs", str(epochs), "--num-workers", "0", "--device", "cpu",
            "--seed", "3", *extra]


def _snapshot(directory):
    """{relative path: sha256} of every file under ``directory``."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _link_copy(src, dst):
    """Private copy of a run directory; *.pt are hard links (the code replaces them atomically,
    so an in-place edit would show in the byte comparisons). Logs and events are copied."""
    shutil.copytree(src, dst, copy_function=lambda s, d: os.link(s, d) if s.endswith(".pt") else shutil.copy2(s, d))


def _expect_user_error(capsys, argv):
    """Run main; expect exit code 2, no traceback; return stderr's lines."""
    return expect_exit_2(capsys, entry, argv).splitlines()


def _assert_one_error_line(lines, *culprits):
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events


def _scalars(run_dir, tag):
    return [(e.step, e.value) for e in _events(run_dir).Scalars(tag)]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The tiny labelled-val/test dataset, generated once (read-only for the tests)."""
    root = tmp_path_factory.mktemp("cryo_data")
    generate_cryoem_demo(root, n_pos=40, n_unl=160, n_val=40, n_test=40, patch_size=32, prior=0.3, seed=5)
    return root


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cryo_runs")


@pytest.fixture(scope="module")
def tiny_config(module_dir):
    return _write_config(module_dir / "tiny.yaml")


@pytest.fixture(scope="module")
def full_run(demo_data, module_dir, tiny_config):
    """One uninterrupted 2-epoch run, shared by the output-file and resume tests."""
    out = module_dir / "out"
    result = entry.main(_argv(tiny_config, demo_data, out, exp="full"))
    return {"result": result, "run_dir": out / "full", "data": demo_data, "config": tiny_config}


@pytest.fixture
def data_copy(demo_data, tmp_path):
    """A private copy of the data that a test may corrupt."""
    dst = tmp_path / "data"
    shutil.copytree(demo_data, dst)
    return dst


# ----------------------------------------------------------------------- 1. outputs of a run

def test_result_is_results_json(full_run):
    run_dir, result = full_run["run_dir"], full_run["result"]
    saved = json.loads((run_dir / "results.json").read_text())
    assert Path(result["run_dir"]) == run_dir
    assert {k: v for k, v in result.items() if k != "run_dir"} == saved


def test_results_json_schema_and_test_metrics(full_run):
    run_dir, data = full_run["run_dir"], full_run["data"]
    text = (run_dir / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert set(results) >= {"best_epoch", "epochs_run", "heldout", "val", "test", "test_at_val_best_f1_threshold",
                            "data"}
    assert results["epochs_run"] == 2 and results["best_epoch"] in (1, 2)
    assert results["heldout"] is False  # the demo data has labelled val and test sets
    for part in ("val", "test", "test_at_val_best_f1_threshold"):
        for key in METRIC_KEYS:
            assert isinstance(results[part][key], float), (part, key)
        for key in ("auc", "ap", "precision", "recall", "f1", "best_f1"):
            assert 0.0 <= results[part][key] <= 1.0, (part, key)
    assert results["test"]["threshold"] == 0.5
    assert results["test_at_val_best_f1_threshold"]["threshold"] == pytest.approx(results["val"]["best_f1_threshold"])
    assert results["data"]["n_val"] == 40 and results["data"]["n_test"] == 40
    assert results["data"]["n_train_positive"] == 40 and results["data"]["n_train_unlabeled"] == 160
    assert results["data"]["patch_size"] == 32

    # Recompute the test metrics from best_model.pt's teacher and the stored test patches.
    best = _load(run_dir / "best_model.pt")
    model = FixMatchPUModel(best["backbone"])
    model.load_state_dict(best["model"], strict=True)
    model.eval()
    stored = torch.load(data / "preprocessed_data.pt", map_location="cpu", weights_only=True)["test"]
    with torch.no_grad():
        probs = torch.sigmoid(model(stored["patches"].float().unsqueeze(1)))
    expected = binary_metrics(stored["labels"].numpy(), probs.numpy())
    at_best = binary_metrics(stored["labels"].numpy(), probs.numpy(), threshold=results["val"]["best_f1_threshold"])
    for key in METRIC_KEYS:
        assert results["test"][key] == pytest.approx(expected[key], abs=1e-5), key
        assert results["test_at_val_best_f1_threshold"][key] == pytest.approx(at_best[key], abs=1e-5), key
    assert results["val"] == pytest.approx(best["val_metrics"], nan_ok=True)
    assert best["epoch"] == results["best_epoch"]


def test_picking_threshold_is_the_best_f1_threshold_of_a_labelled_val_set(full_run):
    run_dir = full_run["run_dir"]
    results = json.loads((run_dir / "results.json").read_text())
    stored = _load(run_dir / "best_model.pt")["picking_threshold"]
    assert stored["rule"] == "val_best_f1" and stored == results["picking_threshold"]
    assert stored["value"] == results["val"]["best_f1_threshold"]
    assert f"picking threshold: val_best_f1 rule {stored['value']:.4f} (best F1" in (run_dir / "train.log").read_text()


def test_config_yaml_holds_the_resolved_config(full_run):
    cfg = yaml.safe_load((full_run["run_dir"] / "config.yaml").read_text())
    # command line beats the YAML file
    assert cfg["data"]["data_dir"] == str(full_run["data"])
    assert cfg["training"]["batch_size"] == 16 and cfg["training"]["epochs"] == 2
    assert cfg["training"]["seed"] == 3 and cfg["training"]["device"] == "cpu" and cfg["data"]["num_workers"] == 0
    # the YAML file beats the defaults; untouched keys keep them
    assert cfg["loss"]["consistency_threshold"] == 0.05 and cfg["training"]["rampup_epochs"] == 1
    assert cfg["training"]["weight_decay"] == 0.0001 and cfg["loss"]["nnpu_gamma"] == 1.0


def test_train_log_has_header_and_epoch_lines(full_run):
    run_dir = full_run["run_dir"]
    lines = (run_dir / "train.log").read_text().splitlines()
    assert "git " in lines[0] and "device cpu" in lines[0] and f"torch {torch.__version__}" in lines[0]
    assert "config " in lines[1] and '"consistency_threshold": 0.05' in lines[1]
    best = _load(run_dir / "best_model.pt")
    for epoch in (1, 2):
        epoch_lines = [line for line in lines if f"epoch {epoch}/2 |" in line]
        assert len(epoch_lines) == 1, epoch_lines
        for word in ("loss", "mask", "pseudo+", "lr", "val auc", "ap", "f1"):
            assert word in epoch_lines[0], word
    best_line = next(line for line in lines if f"epoch {best['epoch']}/2 |" in line)
    assert f"val auc {best['val_metrics']['auc']:.4f}" in best_line
    assert any(line.split(" ", 2)[2].startswith("test (best epoch") for line in lines)
    assert not any("error" in line for line in lines)


def test_checkpoints_load_with_weights_only(full_run):
    run_dir = full_run["run_dir"]
    best, last = _load(run_dir / "best_model.pt"), _load(run_dir / "last.pt")
    for key in BEST_KEYS:
        assert key in best, key
    for key in LAST_KEYS:
        assert key in last, key
    assert best["backbone"] == "resnet18" and best["patch_size"] == 32
    assert best["config"]["training"]["epochs"] == 2
    assert last["epoch"] == 2 and last["best_epoch"] == best["epoch"]
    assert last["best_auc"] == pytest.approx(best["val_metrics"]["auc"])
    student = FixMatchPUModel("resnet18", dropout=0.2)
    student.load_state_dict(last["student"], strict=True)
    FixMatchPUModel("resnet18").load_state_dict(best["student"], strict=True)
    teacher = EMATeacher(student, decay=0.9)
    teacher.load_state_dict(last["teacher"])
    optimizer = torch.optim.Adam(student.parameters())
    optimizer.load_state_dict(last["optimizer"])
    assert optimizer.state
    # the teacher is an average, not a copy of the student
    assert not torch.equal(last["teacher"]["model"]["head.1.weight"], last["student"]["head.1.weight"])
    # per-iteration cosine: after 2 of 2 epochs the schedule is at its end
    assert last["scheduler"]["last_epoch"] == last["scheduler"]["T_max"]


def test_tensorboard_scalars(full_run):
    events = _events(full_run["run_dir"])
    tags = set(events.Tags()["scalars"])
    for tag in REQUIRED_TAGS:
        assert tag in tags, tag
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    value = {tag: [e.value for e in events.Scalars(tag)] for tag in REQUIRED_TAGS}
    # the ramps of TINY_CONFIG: weights 0 in epoch 1, full in epoch 2
    assert value["train/consistency_weight"] == pytest.approx([0.0, 1.0])
    assert value["train/entropy_weight"] == pytest.approx([0.0, 0.01])
    assert value["train/lr"][0] > value["train/lr"][1] > 0  # cosine decay (mean lr of each epoch)
    assert all(0 < v <= 1 for v in value["train/mask_rate"])  # tau 0.05: the mask is not empty
    assert all(0 <= v <= 1 for v in value["train/pseudo_positive_rate"] + value["train/nn_correction_rate"])
    assert all(v > 0 for v in value["train/consistency_loss"] + value["train/entropy_loss"])
    results = json.loads((full_run["run_dir"] / "results.json").read_text())
    best = results["best_epoch"]
    assert value["val/auc"][best - 1] == pytest.approx(results["val"]["auc"], abs=1e-6)


# -------------------------------------------------------------------------------- 2. resuming

def test_resume_after_interruption_continues_exactly(full_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = _argv(full_run["config"], full_run["data"], out, exp="B")
    original = entry.train_one_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during epoch 2, after last.pt of epoch 1 was written
        return original(*args, **kwargs)

    monkeypatch.setattr(entry, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as exc:  # Ctrl-C: one line and exit code 130 (test_robustness.py)
        entry.main(argv)
    assert exc.value.code == 130
    monkeypatch.setattr(entry, "train_one_epoch", original)
    run_dir = out / "B"
    assert _load(run_dir / "last.pt")["epoch"] == 1 and not (run_dir / "results.json").exists()
    log_before = (run_dir / "train.log").read_text()

    # resumed with DataLoader workers: the data and every random draw stay the same
    resumed = entry.main(argv + ["--resume", "--num-workers", "2"])
    log = (run_dir / "train.log").read_text()
    assert log.startswith(log_before) and "resumed from" in log[len(log_before):]
    assert "at epoch 2" in log[len(log_before):]

    a, b = _load(full_run["run_dir"] / "last.pt"), _load(run_dir / "last.pt")
    assert b["epoch"] == 2
    _assert_same_state(a["student"], b["student"])  # bit for bit on the CPU
    _assert_same_state(a["teacher"]["model"], b["teacher"]["model"])
    assert a["scheduler"] == b["scheduler"]
    expected = full_run["result"]
    for part in ("val", "test", "test_at_val_best_f1_threshold"):
        assert resumed[part] == expected[part], part
    assert resumed["best_epoch"] == expected["best_epoch"] and resumed["epochs_run"] == 2
    # TensorBoard continues: one value per epoch, equal to the uninterrupted run's
    for tag in ("train/loss", "val/auc", "train/mask_rate"):
        assert _scalars(run_dir, tag) == _scalars(full_run["run_dir"], tag), tag


def test_resume_of_a_finished_run_changes_nothing(full_run, tmp_path):
    out = tmp_path / "out"
    _link_copy(full_run["run_dir"], out / "full")
    before = _snapshot(out / "full")
    log_before = (out / "full" / "train.log").read_text()
    result = entry.main(_argv(full_run["config"], full_run["data"], out, "--resume", exp="full"))
    after = _snapshot(out / "full")
    assert {k: v for k, v in after.items() if k != "train.log"} == \
        {k: v for k, v in before.items() if k != "train.log"}
    log = (out / "full" / "train.log").read_text()
    assert log.startswith(log_before) and "nothing to train" in log[len(log_before):]
    assert result["test"] == full_run["result"]["test"]


def test_selective_false_nan_loss_and_extending_a_finished_run(demo_data, tmp_path, capsys, monkeypatch):
    """Standard FixMatch for 1 epoch; --resume --epochs 2 hits a NaN loss (one error line naming
    epoch and step, last.pt of epoch 1 intact); --resume again extends the run to epoch 2."""
    import utils.cryoem.epoch as engine

    config = _write_config(tmp_path / "standard.yaml", loss={"selective": False})
    out = tmp_path / "out"
    first = entry.main(_argv(config, demo_data, out, exp="std", epochs=1))
    run_dir = out / "std"
    assert first["epochs_run"] == 1 and first["best_epoch"] == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]["selective"] is False
    assert [s for s, _ in _scalars(run_dir, "train/mask_rate")] == [1]
    last_before = (run_dir / "last.pt").read_bytes()

    original, calls = engine.nnpu_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        result = original(*args, **kwargs)
        if len(calls) == 3:
            result = dict(result, objective=result["objective"] * float("nan"))
        return result

    monkeypatch.setattr(engine, "nnpu_loss", poisoned)
    lines = _expect_user_error(capsys, _argv(config, demo_data, out, "--resume", exp="std", epochs=2))
    assert lines[-1].startswith("error: ") and "epoch 2, step 3" in lines[-1] and "learning_rate" in lines[-1]
    assert (run_dir / "last.pt").read_bytes() == last_before
    assert lines[-1] in (run_dir / "train.log").read_text()  # recorded in the run's log too
    monkeypatch.setattr(engine, "nnpu_loss", original)

    second = entry.main(_argv(config, demo_data, out, "--resume", exp="std", epochs=2))
    assert second["epochs_run"] == 2
    last = _load(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["config"]["training"]["epochs"] == 2
    # the cosine schedule was stretched to the new total and still ends at min_lr
    assert last["scheduler"]["T_max"] == last["scheduler"]["last_epoch"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["epochs"] == 2
    assert [s for s, _ in _scalars(run_dir, "train/loss")] == [1, 2]  # the failed attempt's steps are purged
    assert "training.epochs is now 2 (was 1)" in (run_dir / "train.log").read_text()


def test_resume_refuses_a_changed_config(full_run, tmp_path, capsys):
    out = tmp_path / "out"
    _link_copy(full_run["run_dir"], out / "full")
    before = _snapshot(out / "full")
    config = _write_config(tmp_path / "changed.yaml", loss={"prior": 0.25})
    lines = _expect_user_error(capsys, _argv(config, full_run["data"], out, "--resume", exp="full", epochs=3))
    _assert_one_error_line(lines, "loss.prior", "0.25", "--exp-name")
    assert _snapshot(out / "full") == before


def test_new_run_refuses_a_directory_holding_a_run(full_run, tmp_path, capsys):
    out = tmp_path / "out"
    _link_copy(full_run["run_dir"], out / "full")
    before = _snapshot(out / "full")
    lines = _expect_user_error(capsys, _argv(full_run["config"], full_run["data"], out, exp="full"))
    _assert_one_error_line(lines, str(out / "full"), "--resume", "--exp-name")
    assert _snapshot(out / "full") == before


def test_resume_without_a_run_is_an_error(full_run, tmp_path, capsys):
    lines = _expect_user_error(capsys, _argv(full_run["config"], full_run["data"], tmp_path / "out", "--resume",
                                             exp="nothing"))
    _assert_one_error_line(lines, "--resume", str(tmp_path / "out" / "nothing" / "last.pt"))
    assert not (tmp_path / "out" / "nothing").exists()


def test_early_stopping_ends_the_run_and_resume_then_has_nothing_to_do(full_run, tmp_path, monkeypatch):
    # A constant val AUC improves in epoch 1 only: patience 1 stops after epoch 2 of 3.
    original = cryo_epoch.binary_metrics
    monkeypatch.setattr(cryo_epoch, "binary_metrics", lambda *a, **k: dict(original(*a, **k), auc=0.5))
    config = _write_config(tmp_path / "patience.yaml", training={"early_stopping_patience": 1})
    out = tmp_path / "out"
    argv = _argv(config, full_run["data"], out, exp="es", epochs=3)
    result = entry.main(argv)
    run_dir = out / "es"
    assert result["epochs_run"] == 2 and result["best_epoch"] == 1
    last = _load(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["stopped"] is True and last["early_stopping"]["bad_epochs"] == 1
    assert _load(run_dir / "best_model.pt")["epoch"] == 1
    assert "early stopping" in (run_dir / "train.log").read_text()
    before = _snapshot(run_dir)
    assert entry.main(argv + ["--resume"])["epochs_run"] == 2
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}
    assert "already stopped early after epoch 2; nothing to train" in (run_dir / "train.log").read_text()


def test_val_with_one_class_keeps_the_latest_epoch(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    obj = torch.load(data / "preprocessed_data.pt", weights_only=True)
    obj["val"]["labels"] = torch.zeros_like(obj["val"]["labels"])  # AUC undefined on val
    torch.save(obj, data / "preprocessed_data.pt")
    config = _write_config(tmp_path / "c.yaml", training={"early_stopping_patience": 1})
    result = entry.main(_argv(config, data, tmp_path / "out", exp="one"))
    run_dir = tmp_path / "out" / "one"
    assert result["best_epoch"] == 2 and result["epochs_run"] == 2  # no early stop on an undefined AUC
    assert result["val"]["auc"] is None and result["test_at_val_best_f1_threshold"] is None
    assert isinstance(result["test"]["auc"], float)
    log = (run_dir / "train.log").read_text()
    assert "val AUC is undefined" in log and "holds only label 0" in log
    assert _load(run_dir / "best_model.pt")["epoch"] == 2


def test_heldout_val_test_and_prior_from_metadata(tmp_path):
    data = generate_cryoem_demo(tmp_path / "data", n_pos=40, n_unl=160, n_val=0, n_test=0, patch_size=32,
                                prior=0.25, seed=2, chunk_size=70)
    config = _write_config(tmp_path / "auto.yaml", loss={"prior": "auto"})
    result = entry.main(_argv(config, data, tmp_path / "out", exp="held", epochs=1))
    assert result["heldout"] is True and result["data"]["heldout"] is True
    counts = result["data"]
    assert counts["n_val"] == counts["n_test"] == 4 + 16  # 10% of the positives + 10% of the unlabelled each
    assert counts["n_val_positive"] == 4 and counts["n_train_positive"] == 32 and counts["n_train_unlabeled"] == 128
    assert counts["prior"] == 0.25 and counts["n_files"] == 3
    log = (tmp_path / "out" / "held" / "train.log").read_text()
    assert "underestimate the true AUC" in log and "prior 0.25 (from the data's metadata)" in log
    assert _load(tmp_path / "out" / "held" / "last.pt")["split"]["heldout"] == {"val": True, "test": True}
    assert "WARNING" not in log  # prior auto: nothing to warn about
    # no labelled val set and no micrograph geometry (patch data): the picking threshold calls the
    # prior's fraction (0.25) of the unlabelled training windows particles, scored by the saved teacher
    best = _load(tmp_path / "out" / "held" / "best_model.pt")
    stored = best["picking_threshold"]
    assert stored["rule"] == "prior_windows" and stored["prior"] == 0.25 and stored["n_windows"] == 128
    data_set = load_pu_data(data, split=_load(tmp_path / "out" / "held" / "last.pt")["split"])
    model = FixMatchPUModel(best["backbone"])
    model.load_state_dict(best["model"])
    model.eval()
    with torch.no_grad():
        patches = torch.stack([data_set.train[i][0] for i in range(data_set.n_pos, len(data_set.train))])
        scores = torch.sigmoid(model(patches)).numpy()
    assert int((scores >= stored["value"] - 1e-6).sum()) == 32  # round(0.25 * 128)
    assert stored["value"] == pytest.approx(float(np.sort(scores)[::-1][31]), abs=1e-6)


def test_a_configured_prior_far_from_the_datas_is_a_loud_warning(tmp_path):
    data = generate_cryoem_demo(tmp_path / "data", n_pos=40, n_unl=160, n_val=0, n_test=0, patch_size=32,
                                prior=0.05, seed=2)
    config = _write_config(tmp_path / "prior.yaml", loss={"prior": 0.3})
    entry.main(_argv(config, data, tmp_path / "out", exp="far", epochs=1))
    log = (tmp_path / "out" / "far" / "train.log").read_text()
    assert "WARNING: loss.prior 0.3 is 6.0x off the prior the data" in log and "(0.05)" in log
    assert "set loss.prior: auto" in log
    assert prior_mismatch(0.1, SimpleNamespace(metadata={"prior": 0.05}, files=[])) is None  # 2x: quiet
    assert prior_mismatch(0.024, SimpleNamespace(metadata={"prior": 0.05}, files=[])) is not None


def test_auto_prior_without_a_prior_in_the_data_uses_the_documented_default(tmp_path):
    # data written by another tool: preprocessed_data.pt with patches and a metadata dict that has no prior
    data = generate_cryoem_demo(tmp_path / "data", n_pos=40, n_unl=160, n_val=0, n_test=0, patch_size=32,
                                prior=0.1, seed=2)
    obj = torch.load(data / "preprocessed_data.pt", weights_only=True)
    del obj["metadata"]["prior"]
    torch.save(obj, data / "preprocessed_data.pt")
    config = _write_config(tmp_path / "auto.yaml", loss={"prior": "auto"})
    result = entry.main(_argv(config, data, tmp_path / "out", exp="seed", epochs=1))
    assert result["data"]["prior"] == 0.3
    log = (tmp_path / "out" / "seed" / "train.log").read_text()
    assert "hold no metadata.prior" in log and "using 0.3, the documented default, NOT an estimate" in log
    assert "set loss.prior in the YAML config or pass --prior" in log
    assert "prior 0.3 (the documented default: the data hold no prior)" in log
    # --prior on the command line wins over the YAML's auto, and the warning goes
    result = entry.main(_argv(config, data, tmp_path / "out", "--prior", "0.15", exp="flag", epochs=1))
    assert result["data"]["prior"] == 0.15
    assert "documented default" not in (tmp_path / "out" / "flag" / "train.log").read_text()


def test_a_prior_in_the_data_that_is_not_a_probability_is_an_error(tmp_path, capsys):
    data = generate_cryoem_demo(tmp_path / "data", n_pos=40, n_unl=160, n_val=0, n_test=0, patch_size=32,
                                prior=0.1, seed=2)
    obj = torch.load(data / "preprocessed_data.pt", weights_only=True)
    obj["metadata"]["prior"] = 1.5
    torch.save(obj, data / "preprocessed_data.pt")
    config = _write_config(tmp_path / "auto.yaml", loss={"prior": "auto"})
    lines = _expect_user_error(capsys, _argv(config, data, tmp_path / "out", exp="bad", epochs=1))
    _assert_one_error_line(lines, "metadata.prior 1.5", "loss.prior")
    lines = _expect_user_error(capsys, _argv(config, data, tmp_path / "out", "--prior", "2", exp="bad", epochs=1))
    _assert_one_error_line(lines, "--prior", "loss.prior", "2")


# ------------------------------------------------------------------------------- 3. bad input

def _missing_data_dir(data, tmp_path):
    shutil.rmtree(data)
    return {}, [str(data)]


def _prior_out_of_range(data, tmp_path):
    return {"loss": {"prior": 1.5}}, ["loss.prior", "1.5"]


def _unknown_yaml_key(data, tmp_path):
    return {"training": {"learning_rat": 0.001}}, ["training.learning_rat"]


def _batch_too_small_for_ratio(data, tmp_path):
    # a new run names the sampler's constraint; a resume first refuses the changed batch size
    return {"__argv__": ["--batch-size", "2"]}, {"new-run": ["batch_size 2", "batch_ratio [1, 4]", "batch_size >="],
                                                 "resume": ["training.batch_size", "--resume"]}


def _nan_patch(data, tmp_path):
    path = data / "preprocessed_data.pt"
    obj = torch.load(path, weights_only=True)
    obj["patches"]["unlabeled"][7, 3, 4] = float("nan")
    torch.save(obj, path)
    return {}, ["preprocessed_data.pt"]


def _no_positives(data, tmp_path):
    path = data / "preprocessed_data.pt"
    obj = torch.load(path, weights_only=True)
    obj["patches"]["positive"] = obj["patches"]["positive"][:0]
    torch.save(obj, path)
    return {}, ["positive"]


BAD_INPUTS = [
    pytest.param(_missing_data_dir, id="missing-data-dir"),
    pytest.param(_prior_out_of_range, id="prior-1.5"),
    pytest.param(_unknown_yaml_key, id="unknown-yaml-key"),
    pytest.param(_batch_too_small_for_ratio, id="batch-2-ratio-1-4"),
    pytest.param(_nan_patch, id="nan-patch"),
    pytest.param(_no_positives, id="no-positives"),
]


@pytest.mark.parametrize("mode", ["new-run", "resume"])
@pytest.mark.parametrize("prepare", BAD_INPUTS)
def test_bad_input_is_one_error_line(prepare, mode, full_run, data_copy, tmp_path, capsys):
    out = tmp_path / "out"
    if mode == "resume":  # an existing run, which must survive the bad command byte for byte
        _link_copy(full_run["run_dir"], out / "full")
        before = _snapshot(out / "full")
    sections, culprits = prepare(data_copy, tmp_path)
    extra = sections.pop("__argv__", [])
    config = _write_config(tmp_path / "bad.yaml", **sections)
    argv = _argv(config, data_copy, out, *(["--resume"] if mode == "resume" else []), exp="full") + extra
    lines = _expect_user_error(capsys, argv)
    _assert_one_error_line(lines, *(culprits[mode] if isinstance(culprits, dict) else culprits))
    if mode == "resume":
        assert _snapshot(out / "full") == before
    else:
        assert not (out / "full").exists()  # nothing created for a command that cannot run


def test_bad_exp_name_and_missing_config(full_run, tmp_path, capsys):
    lines = _expect_user_error(capsys, _argv(full_run["config"], full_run["data"], tmp_path, exp="a/b"))
    _assert_one_error_line(lines, "--exp-name", "a/b")
    lines = _expect_user_error(capsys, _argv(tmp_path / "none.yaml", full_run["data"], tmp_path))
    _assert_one_error_line(lines, "none.yaml")


# ------------------------------------------------------------------------ 4. argument parsing

def test_parser_defaults_and_help(capsys):
    path = entry.resolve_config_path(entry.DEFAULT_CONFIG)
    args = entry.build_parser(path).parse_args([])
    assert args.config == "configs/pu_selective_fixmatch.yaml" and args.output_dir == "experiments"
    assert args.resume is False and args.exp_name is None
    cfg = load_config(path)
    for flag, key in entry.CONFIG_FLAGS.items():  # the defaults are the config's values
        assert getattr(args, flag[2:].replace("-", "_")) == value_at(cfg, key), flag
    with pytest.raises(SystemExit) as exc:
        entry.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--exp-name", "--data-dir", "--batch-size", "--epochs", "--output-dir", "--resume",
                 "--seed", "--device", "--num-workers"):
        assert flag in text, flag
    assert re.search(r"default:\s+configs/pu_selective_fixmatch\.yaml", text)


def test_default_exp_name_is_the_config_stem(full_run, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(entry, "run", lambda cfg, spec: seen.update(cfg=cfg, spec=spec) or {})
    entry.main(["--config", str(full_run["config"]), "--output-dir", str(tmp_path)])
    assert seen["spec"].run_dir == tmp_path / "tiny" and not seen["spec"].resume
    assert seen["cfg"]["training"]["batch_size"] == 32  # the YAML's value when no flag is given
    assert math.isclose(seen["cfg"]["training"]["learning_rate"], 0.001)
