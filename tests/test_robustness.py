"""A hostile but fair user: bad inputs, busy directories, kills and Ctrl-C, for every command.

Each bad input must end with exit code 2, one ``error: ...`` line naming the culprit and what
was expected, no traceback, and nothing written (a new output folder is not created, an
existing one stays byte for byte). Runs are tiny CPU runs (see conftest.py and
test_cryoem_train.py), called in-process through ``main([...])``; one test sends a real SIGINT
to a subprocess.

Sections: 1 output locations, 3 checkpoints of the wrong kind, 4 ANA images wider than 8 bits,
5 micrographs that cannot hold particles, 6 STAR files with a block per micrograph, 7 ANA
duplicates and split leaks, 9 one run per directory, 10 Ctrl-C, 11 leftover temporary files,
12 runs killed in their first epoch. (2, the flag ranges, is in test_checks.py.)
"""
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import evaluate_picks
import main
import pick_particles
import preprocess_cryoem
import train_pu_selective_fixmatch as cryo_entry
import utils.run as run_frame
from conftest import cpu_argv, expect_error_line
from datasets.synthetic_cryoem import generate_cryoem_demo
from models.fixmatch_pu import FixMatchPUModel
from test_cryoem_preprocess import tiny_micrographs  # noqa: F401 (a fixture, used through mics)
from test_cryoem_train import _argv as cryo_argv
from test_cryoem_train import _write_config
from test_main_cli import _link_copy
from utils.checkpoint import checkpoint_kind, save_checkpoint
from utils.run_lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]


def tree(folder):
    """Every path under ``folder`` (hidden ones included) with a hash of each file: what
    "nothing written" compares."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def write_mrc(path, array):
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile's header statistics of NaN/inf data
        mrc.set_data(np.asarray(array, dtype=np.float32))
    return path


def holder(folder):
    """A subprocess that holds ``folder``'s run lock until killed (POSIX locks do not conflict
    within one process, so the other run must be another process)."""
    code = ("import sys, time\nfrom utils.run_lock import RunLock\nRunLock(sys.argv[1]).acquire()\n"
            "print('locked', flush=True)\ntime.sleep(300)\n")
    Path(folder).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def stop(proc):
    proc.kill()
    proc.wait()
    proc.stdout.close()


def stale_lock(folder):
    """A lock file left by a process of this host that has ended (as after kill -9); returns its pid."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                      "started": "2024-01-01 00:00:00", "command": "killed run"}))
    return dead.pid


# ----------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("robustness")


@pytest.fixture(scope="module")
def ana_done(tiny_ana_master, shared):
    """A finished 1-epoch ANA run with its best-model files."""
    run_dir = shared / "ana_done"
    main.main(cpu_argv(tiny_ana_master, run_dir, shared / "cache", "--epoch", "1", "--saveModel"))
    return run_dir


@pytest.fixture(scope="module")
def cryo(shared):
    """Tiny CryoEM data and config, and a finished 1-epoch run."""
    data = generate_cryoem_demo(shared / "cryo_data", n_pos=40, n_unl=160, n_val=40, n_test=40, patch_size=32,
                                prior=0.3, seed=5)
    config = _write_config(shared / "tiny.yaml")
    cryo_entry.main(cryo_argv(config, data, shared / "cryo_out", exp="done", epochs=1))
    return {"data": data, "config": config, "run_dir": shared / "cryo_out" / "done"}


@pytest.fixture
def mics(tiny_micrographs):
    """test_cryoem_preprocess.py's 3 micrographs 96 x 128 (mic_c for test) with their CSV of centres."""
    folder, coords = tiny_micrographs
    return {"dir": folder, "coords": coords, "table": pd.read_csv(coords)}


def preprocess_argv(mics, out, *extra):
    return ["--micrographs", str(mics["dir"]), "--coordinates", str(mics["coords"]), "--output-dir", str(out),
            "--particle-radius", "8", "--patch-size", "16", "--context", "0", "--stride", "8",
            "--test-micrographs", "mic_c", *extra]


@pytest.fixture(scope="module")
def picker(shared):
    """An untrained best_model.pt (64 px window, no context) and a 128 x 128 micrograph to pick on."""
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=0)
    state = model.state_dict()
    path = shared / "best_model.pt"
    save_checkpoint({"model": state, "student": state, "config": {}, "epoch": 1, "val_metrics": None,
                     "backbone": "resnet18", "patch_size": 64, "prior": 0.3, "context": 0,
                     "data_metadata": {"downsample": 1.0, "normalization": "zscore", "particle_radius": 10.0}}, path)
    mic = write_mrc(shared / "pick_mic.mrc", np.random.default_rng(1).normal(size=(128, 128)))
    return {"ckpt": path, "mic": mic}


def pick_argv(picker, out, *extra, mic=None):
    return ["--checkpoint", str(picker["ckpt"]), "--micrographs", str(mic or picker["mic"]), "--output-dir", str(out),
            "--device", "cpu", "--threshold", "0", *extra]


@pytest.fixture
def pick_files(tmp_path):
    picks = tmp_path / "picks.csv"
    picks.write_text("micrograph,x,y,score\nm1,10,10,0.9\nm1,50,50,0.4\n")
    reference = tmp_path / "reference.csv"
    reference.write_text("micrograph,x,y\nm1,11,10\nm1,80,80\n")
    return picks, reference


# ------------------------------------------------------------------- 1. output locations

def _command_with_output(name, where, ana_args, tmp_path, cryo, mics, picker, pick_files):
    """(entry, argv) of command ``name`` writing to ``where``."""
    if name == "main.py run directory":
        return main, ana_args("--epoch", "1", "--pathModelParams", str(where))
    if name == "main.py --cacheDir":
        return main, ana_args("--epoch", "1", "--cacheDir", str(where))
    if name == "train --output-dir":
        return cryo_entry, cryo_argv(cryo["config"], cryo["data"], where, exp="x")
    if name == "preprocess --output-dir":
        return preprocess_cryoem, preprocess_argv(mics, where)
    if name == "pick --output-dir":
        return pick_particles, pick_argv(picker, where)
    picks, reference = pick_files
    return evaluate_picks, ["--picks", str(picks), "--reference", str(reference), "--radius", "5",
                            "--output-dir", str(where)]


OUTPUT_COMMANDS = ["main.py run directory", "main.py --cacheDir", "train --output-dir", "preprocess --output-dir",
                   "pick --output-dir", "evaluate --output-dir"]


@pytest.mark.parametrize("name", OUTPUT_COMMANDS)
@pytest.mark.parametrize("kind", ["a file", "below a file", "unwritable"])
def test_output_location_that_cannot_be_a_folder(name, kind, ana_args, tmp_path, cryo, mics, picker, pick_files,
                                                 unwritable_dir, capsys):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("keep me")
    where = {"a file": blocker, "below a file": blocker / "out", "unwritable": unwritable_dir / "out"}[kind]
    entry, argv = _command_with_output(name, where, ana_args, tmp_path, cryo, mics, picker, pick_files)
    before = tree(tmp_path)
    line = expect_error_line(capsys, entry, argv)
    assert str(where) in line or str(where.parent) in line, line
    assert ("cannot create files in" if kind == "unwritable" else "is a file") in line, line
    assert tree(tmp_path) == before  # nothing written anywhere (no run directory, cache, log, lock)
    assert not (unwritable_dir / "out").exists()


def test_a_complete_tile_cache_need_not_be_writable(ana_done, tiny_ana_master, shared, tmp_path, monkeypatch):
    """A shared read-only cache that holds every tile needs no write: only a missing file asks for one."""
    checked = []
    original = main.check_output_dir
    for module in (main, run_frame):  # the run directory is checked by utils/run.py, the cache by main.run
        monkeypatch.setattr(module, "check_output_dir", lambda path, flag: checked.append(flag) or original(path, flag))
    main.main(cpu_argv(tiny_ana_master, tmp_path / "run", shared / "cache", "--epoch", "1"))
    assert checked == ["--pathModelParams"]
    main.main(cpu_argv(tiny_ana_master, tmp_path / "run2", tmp_path / "new_cache", "--epoch", "1"))
    assert checked[1:] == ["--pathModelParams", "--cacheDir"]


def test_pick_refuses_an_output_folder_whose_box_is_a_file(picker, tmp_path, capsys):
    out = tmp_path / "picks"
    out.mkdir()
    (out / "box").write_text("not a folder")
    before = tree(tmp_path)
    line = expect_error_line(capsys, pick_particles, pick_argv(picker, out))
    assert f"{out / 'box'} is a file; expected a folder" in line
    assert tree(tmp_path) == before


# ------------------------------------------------------------ 3. checkpoints of the wrong kind

def test_real_checkpoints_say_what_they_are(ana_done, cryo):
    def kind(path):
        return checkpoint_kind(torch.load(path, map_location="cpu", weights_only=True))

    assert kind(ana_done / "last.pt") == "ana-run"
    assert {kind(p) for p in ana_done.glob("1_*.pt")} == {"ana-model"}
    assert kind(cryo["run_dir"] / "last.pt") == "cryoem-run"
    assert kind(cryo["run_dir"] / "best_model.pt") == "cryoem-best"
    assert kind(cryo["data"] / "preprocessed_data.pt") == "cryoem-data"


def _ana_run_with_last(tmp_path, ana_done, last):
    run_dir = tmp_path / "run"
    _link_copy(ana_done, run_dir)
    (run_dir / "last.pt").unlink()
    if isinstance(last, bytes):
        (run_dir / "last.pt").write_bytes(last)
    else:
        shutil.copy(last, run_dir / "last.pt")
    return run_dir


@pytest.mark.parametrize("which, expected", [
    ("cryo-last", "is a CryoEM run state (last.pt of train_pu_selective_fixmatch.py); expected an ANA run state"),
    ("cryo-best", "is a CryoEM best model (best_model.pt of train_pu_selective_fixmatch.py); expected an ANA run"),
    ("text", "cannot be read: not a PyTorch checkpoint"),
])
def test_load_model_names_what_the_checkpoint_is(which, expected, ana_done, cryo, ana_args, tmp_path, capsys):
    source = {"cryo-last": cryo["run_dir"] / "last.pt", "cryo-best": cryo["run_dir"] / "best_model.pt",
              "text": b"epoch 3\n"}[which]
    run_dir = _ana_run_with_last(tmp_path, ana_done, source)
    before = tree(run_dir)
    line = expect_error_line(capsys, main, ana_args("--loadModel", "--epoch", "2"))
    assert line.startswith(f"error: --loadModel {run_dir / 'last.pt'} ") and expected in line, line
    assert tree(run_dir) == before


@pytest.mark.parametrize("which, expected", [
    ("ana-last", "is an ANA run state (last.pt of main.py / main_single.py); expected a ResNet state_dict"),
    ("cryo-best", "is a CryoEM best model"),
    ("cryo-data", "is CryoEM training data"),
])
def test_pretrained_weights_name_what_the_file_is(which, expected, ana_done, cryo, ana_args, tmp_path, capsys):
    path = {"ana-last": ana_done / "last.pt", "cryo-best": cryo["run_dir"] / "best_model.pt",
            "cryo-data": cryo["data"] / "preprocessed_data.pt"}[which]
    line = expect_error_line(capsys, main, ana_args("--epoch", "1", "--pretrained", "--pretrainedWeights", str(path)))
    assert f"--pretrainedWeights {path} {expected}" in line, line
    assert not (tmp_path / "run").exists()


def test_an_ana_best_model_file_is_accepted_as_pretrained_weights(ana_done):
    from models.backbones import build_resnet_classifier
    best = next(ana_done.glob("1_*.pt"))
    model = build_resnet_classifier("resnet18", 4, pretrained=True, weights_file=best)
    saved = torch.load(best, weights_only=True)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])


@pytest.mark.parametrize("which, expected", [
    ("ana-last", "is an ANA run state"), ("ana-best", "is an ANA model state_dict"),
    ("cryo-last", "is a CryoEM run state"), ("cryo-data", "is CryoEM training data"),
    ("text", "cannot be read: not a PyTorch checkpoint"),
])
def test_pick_names_what_the_checkpoint_is(which, expected, ana_done, cryo, picker, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("no")
    path = {"ana-last": ana_done / "last.pt", "ana-best": next(ana_done.glob("1_*.pt")),
            "cryo-last": cryo["run_dir"] / "last.pt", "cryo-data": cryo["data"] / "preprocessed_data.pt",
            "text": junk}[which]
    line = expect_error_line(capsys, pick_particles, pick_argv(dict(picker, ckpt=path), tmp_path / "out"))
    assert f"--checkpoint {path} {expected}" in line and "expected a CryoEM best model" in line, line
    assert not (tmp_path / "out").exists()


def test_resume_names_an_ana_checkpoint(ana_done, cryo, tmp_path, capsys):
    out = tmp_path / "out"
    _link_copy(cryo["run_dir"], out / "done")
    (out / "done" / "last.pt").unlink()
    shutil.copy(ana_done / "last.pt", out / "done" / "last.pt")
    before = tree(out)
    line = expect_error_line(capsys, cryo_entry, cryo_argv(cryo["config"], cryo["data"], out, "--resume", exp="done",
                                                        epochs=2))
    assert "is an ANA run state (last.pt of main.py / main_single.py); expected a CryoEM run state" in line, line
    assert tree(out) == before


# ---------------------------------------------------------------- 4. ANA images wider than 8 bits

@pytest.mark.parametrize("kind", ["uint16", "float32", "int32"])
def test_ana_images_wider_than_8_bits_are_refused(kind, tiny_ana, ana_args, tmp_path, capsys):
    ann = pd.read_csv(tiny_ana / "annotations.csv", dtype=str, keep_default_na=False)
    name = ann.loc[ann["Split"] == "train", "path"].iloc[0]
    with Image.open(tiny_ana / "images" / name) as im:
        green = np.asarray(im.convert("RGB"))[..., 1].astype(np.float64)
    values = {"uint16": (green * 257).astype(np.uint16), "float32": (green / 255).astype(np.float32),
              "int32": (green * 1000).astype(np.int32)}[kind]
    wide = Path(name).with_suffix(".tif").name
    Image.fromarray(values).save(tiny_ana / "images" / wide)
    ann.loc[ann["path"] == name, "path"] = wide
    ann.to_csv(tiny_ana / "annotations.csv", index=False)
    line = expect_error_line(capsys, main, ana_args("--epoch", "1"))
    words = {"uint16": "16-bit integer", "float32": "32-bit float", "int32": "32-bit integer"}[kind]
    assert f"image {tiny_ana / 'images' / wide} is a {words} image" in line and "expected 8-bit grey or RGB" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# ----------------------------------------------------- 5. micrographs that cannot hold particles

BAD_PIXELS = {"nan": (np.nan, "pixel(s) are NaN or infinite (the first at x=7, y=3)"),
              "inf": (np.inf, "pixel(s) are NaN or infinite (the first at x=7, y=3)"),
              "constant": (None, "every pixel is 0 (a blank image)")}


def _spoil(path, kind):
    with mrcfile.open(path) as mrc:
        array = np.array(mrc.data)
    if kind == "constant":
        array[:] = 0
    else:
        array[3, 7] = BAD_PIXELS[kind][0]
    write_mrc(path, array)


@pytest.mark.parametrize("kind", list(BAD_PIXELS))
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "over-earlier-data"])
def test_preprocess_refuses_micrographs_without_usable_pixels(kind, existing, mics, tmp_path, capsys):
    out = tmp_path / "data"
    if existing:
        preprocess_cryoem.main(preprocess_argv(mics, out))
    before = tree(tmp_path / "data") if existing else None
    _spoil(mics["dir"] / "mic_b.mrc", kind)
    line = expect_error_line(capsys, preprocess_cryoem, preprocess_argv(mics, out, "--overwrite"))
    assert f"{mics['dir'] / 'mic_b.mrc'}: " in line and BAD_PIXELS[kind][1] in line, line
    if existing:
        assert tree(out) == before
    else:
        assert not out.exists()


@pytest.mark.parametrize("kind", list(BAD_PIXELS) + ["too-small"])
def test_pick_refuses_micrographs_it_cannot_pick_on(kind, picker, tmp_path, capsys):
    good = write_mrc(tmp_path / "a_good.mrc", np.random.default_rng(2).normal(size=(128, 128)))
    bad = tmp_path / "b_bad.mrc"
    if kind == "too-small":
        write_mrc(bad, np.random.default_rng(3).normal(size=(48, 200)))
        message = "200x48 px, 200x48 after downsampling by 1, is smaller than the model's 64 px window"
    else:
        shutil.copy(good, bad)
        _spoil(bad, kind)
        message = BAD_PIXELS[kind][1]
    line = expect_error_line(capsys, pick_particles, pick_argv(picker, tmp_path / "out", mic=tmp_path))
    assert f"{bad}: " in line and message in line, line
    assert not (tmp_path / "out").exists()  # the good micrograph's picks were not written either


# ------------------------------------------------------ 6. STAR files with a block per micrograph

def _per_micrograph_star(table, path):
    """RELION's layout with one ``data_<micrograph>`` block per micrograph, no name column."""
    text = ""
    for name, group in table.groupby("micrograph", sort=True):
        text += f"\ndata_{Path(name).stem}\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
        text += "".join(f"{x:.1f} {y:.1f}\n" for x, y in zip(group["x"], group["y"]))
    path.write_text(text)
    return path


def test_preprocess_reads_every_block_of_a_per_micrograph_star(mics, tmp_path):
    star = _per_micrograph_star(mics["table"], tmp_path / "per_mic.star")
    a = preprocess_cryoem.main(preprocess_argv(mics, tmp_path / "from_csv"))
    b = preprocess_cryoem.main(preprocess_argv(dict(mics, coords=star), tmp_path / "from_star"))
    for key in ("n_positive", "n_unlabeled"):
        assert a[key] == b[key], key
    assert a["metadata"]["prior"] == b["metadata"]["prior"]
    assert b["micrographs"]["mic_c.mrc"]["n_positive"] == 4  # the test block is read: its labels are not all 0
    assert (tmp_path / "from_csv" / "labelled_positives.csv").read_text() == \
        (tmp_path / "from_star" / "labelled_positives.csv").read_text()
    test_a, test_b = (torch.load(tmp_path / d / "test.pt", weights_only=True) for d in ("from_csv", "from_star"))
    assert torch.equal(test_a["labels"], test_b["labels"]) and torch.equal(test_a["patches"], test_b["patches"])


def test_evaluate_reads_every_block_of_a_per_micrograph_star(tmp_path, capsys):
    reference = pd.DataFrame({"micrograph": ["m1"] * 3 + ["m2"] * 2, "x": [10.0, 40.0, 70.0, 15.0, 90.0],
                              "y": [10.0, 40.0, 70.0, 20.0, 90.0]})
    star = _per_micrograph_star(reference, tmp_path / "reference.star")
    csv = tmp_path / "reference.csv"
    reference.to_csv(csv, index=False)
    picks = tmp_path / "picks.csv"
    picks.write_text("micrograph,x,y,score\nm1,11,10,0.9\nm2,16,20,0.8\nm2,50,50,0.3\n")
    a = evaluate_picks.main(["--picks", str(picks), "--reference", str(csv), "--radius", "5",
                             "--output-dir", str(tmp_path / "a")])
    b = evaluate_picks.main(["--picks", str(picks), "--reference", str(star), "--radius", "5",
                             "--output-dir", str(tmp_path / "b")])
    assert a["overall"] == b["overall"] and a["per_micrograph"] == b["per_micrograph"]
    assert b["overall"]["n_targets"] == 5 and b["per_micrograph"]["m2"]["tp"] == 1


# ------------------------------------------------------------ 7. ANA duplicates and split leaks

def _move_rows(data, split_from, split_to, n=2):
    """Copy ``n`` rows of ``split_from`` into ``split_to`` (the same image in both); return their paths."""
    path = data / "annotations.csv"
    ann = pd.read_csv(path, dtype=str, keep_default_na=False)
    rows = ann[ann["Split"] == split_from].head(n).assign(Split=split_to)
    pd.concat([ann, rows]).to_csv(path, index=False)
    return list(rows["path"])


@pytest.mark.parametrize("pair", [("train", "test"), ("train", "val"), ("val", "test")])
def test_an_image_in_two_splits_is_an_error(pair, tiny_ana, ana_args, tmp_path, capsys):
    leaked = _move_rows(tiny_ana, *pair)
    line = expect_error_line(capsys, main, ana_args("--epoch", "1"))
    assert f"2 image(s) are in both {pair[0]} and {pair[1]} ({leaked[0]}, {leaked[1]})" in line
    assert "--allowSplitOverlap" in line and "annotations.csv" in line
    assert not (tmp_path / "run").exists()


def test_an_allowed_leak_and_duplicates_are_warned_in_the_log(tiny_ana, ana_args, tmp_path):
    leaked = _move_rows(tiny_ana, "train", "test", n=1)
    doubled = _move_rows(tiny_ana, "train", "train", n=3)  # the same rows twice within train
    main.main(ana_args("--epoch", "1", "--allowSplitOverlap"))
    log = (tmp_path / "run" / "output.txt").read_text()
    assert f"1 image(s) are in both train and test ({leaked[0]}); allowed by --allowSplitOverlap" in log
    assert f"train: 3 image(s) listed more than once (3 extra rows; {', '.join(doubled)})" in log


# ------------------------------------------------------------------- 9. one run per directory

@pytest.mark.parametrize("command", ["main.py", "train", "preprocess", "pick"])
def test_a_second_run_in_a_busy_directory_is_refused(command, ana_args, cryo, mics, picker, tmp_path, capsys):
    folder, entry, argv = {
        "main.py": (tmp_path / "run", main, ana_args("--epoch", "1")),
        "train": (tmp_path / "out" / "x", cryo_entry, cryo_argv(cryo["config"], cryo["data"], tmp_path / "out",
                                                                exp="x")),
        "preprocess": (tmp_path / "data", preprocess_cryoem, preprocess_argv(mics, tmp_path / "data")),
        "pick": (tmp_path / "picks", pick_particles, pick_argv(picker, tmp_path / "picks")),
    }[command]
    proc = holder(folder)
    try:
        before = tree(folder)
        line = expect_error_line(capsys, entry, argv)
        assert f"{folder} is in use by another run: pid {proc.pid} on host {socket.gethostname()}" in line, line
        assert tree(folder) == before  # only the holder's lock file
    finally:
        stop(proc)


def test_ana_takes_over_a_stale_lock_and_says_so(ana_args, tmp_path):
    pid = stale_lock(tmp_path / "run")
    main.main(ana_args("--epoch", "1"))
    log = (tmp_path / "run" / "output.txt").read_text()
    assert f"took over the stale lock {tmp_path / 'run' / LOCK_NAME} of pid {pid} on host" in log
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released at the end


def test_cryoem_takes_over_a_stale_lock_and_says_so(cryo, tmp_path):
    pid = stale_lock(tmp_path / "out" / "x")
    cryo_entry.main(cryo_argv(cryo["config"], cryo["data"], tmp_path / "out", exp="x", epochs=1))
    log = (tmp_path / "out" / "x" / "train.log").read_text()
    assert f"took over the stale lock {tmp_path / 'out' / 'x' / LOCK_NAME} of pid {pid} on host" in log
    assert not (tmp_path / "out" / "x" / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ 10. Ctrl-C

def _interrupt_in_epoch(monkeypatch, module, epoch, name="train_one_epoch"):
    """Make ``module.<name>`` (the run's per-epoch call) raise KeyboardInterrupt in epoch ``epoch``."""
    original = getattr(module, name)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    return original


def _interrupted_line(capsys, entry, argv):
    capsys.readouterr()
    try:
        entry.main(argv)
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # what a traceback would show; caught here so that pytest carries on
        pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt")
    else:
        pytest.fail("the interrupted command returned normally")
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped by Ctrl-C"), err
    return line


def _resume_argv(line, script):
    """The arguments of the command the message gives (after ``<python> <script>``)."""
    words = shlex.split(line.split(": ", 2)[-1])
    assert Path(words[1]).name == script, words
    return words[2:]


def test_ctrl_c_in_ana_says_where_and_how_to_resume(ana_args, tmp_path, capsys, monkeypatch):
    argv = ana_args("--epoch", "2")
    original = _interrupt_in_epoch(monkeypatch, main, 2, name="train_epoch")
    line = _interrupted_line(capsys, main, argv)
    last = tmp_path / "run" / "last.pt"
    assert f"after epoch 1 of 2 (saved in {last}); to resume: " in line, line
    assert line in (tmp_path / "run" / "output.txt").read_text()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    resume = _resume_argv(line, "main.py")
    assert resume == argv + ["--loadModel"]
    monkeypatch.setattr(main, "train_epoch", original)
    result = main.main(resume)
    assert torch.load(last, weights_only=True)["epoch"] == 2 and result["best"]


def test_ctrl_c_in_cryoem_first_epoch_then_the_given_command_starts_again(cryo, tmp_path, capsys, monkeypatch):
    argv = cryo_argv(cryo["config"], cryo["data"], tmp_path / "out", exp="x", epochs=2)
    original = _interrupt_in_epoch(monkeypatch, cryo_entry, 1)
    line = _interrupted_line(capsys, cryo_entry, argv)
    assert "before the first of 2 epochs finished (no last.pt yet); to start it again at epoch 1: " in line, line
    run_dir = tmp_path / "out" / "x"
    assert line in (run_dir / "train.log").read_text() and not (run_dir / "last.pt").exists()
    resume = _resume_argv(line, "train_pu_selective_fixmatch.py")
    assert resume == argv + ["--resume"]
    monkeypatch.setattr(cryo_entry, "train_one_epoch", original)
    assert cryo_entry.main(resume)["epochs_run"] == 2


def test_ctrl_c_in_cryoem_after_an_epoch(cryo, tmp_path, capsys, monkeypatch):
    argv = cryo_argv(cryo["config"], cryo["data"], tmp_path / "out", exp="x", epochs=2)
    _interrupt_in_epoch(monkeypatch, cryo_entry, 2)
    line = _interrupted_line(capsys, cryo_entry, argv)
    assert f"after epoch 1 of 2 (saved in {tmp_path / 'out' / 'x' / 'last.pt'}); to resume: " in line, line
    assert line.endswith(" --resume")


def test_ctrl_c_in_preprocessing_leaves_the_folder_as_it_was(mics, tmp_path, capsys, monkeypatch):
    out = tmp_path / "data"
    preprocess_cryoem.main(preprocess_argv(mics, out))
    before = tree(out)

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess_cryoem, "read_micrograph", interrupted)
    line = _interrupted_line(capsys, preprocess_cryoem, preprocess_argv(mics, out, "--overwrite"))
    assert line.startswith("interrupted: stopped by Ctrl-C; to run it again: ") and "preprocess_cryoem.py" in line
    assert tree(out) == before  # no temporary folder, no lock file, the earlier data intact


def test_a_real_sigint_ends_main_py_in_one_line(tiny_ana, tmp_path):
    """SIGINT to a real process with DataLoader workers: one line, exit 130, no traceback from
    the main process or its workers."""
    run_dir = tmp_path / "run"
    argv = cpu_argv(tiny_ana, run_dir, tmp_path / "cache", "--epoch", "500", "--patience", "0")
    argv[argv.index("--numWorkers") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT as a terminal delivers it, also when pytest itself runs as a background job (whose
    # children start with SIGINT ignored, and then Python installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "last.pt").exists():  # an epoch is saved: the run is in its epoch loop
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("interrupted: stopped by Ctrl-C after epoch ") and last_line.endswith("--loadModel")
    assert last_line in (run_dir / "output.txt").read_text()
    assert not (run_dir / LOCK_NAME).exists()


# --------------------------------------------------------------- 11. leftover temporary files

def _leftover(folder, name):
    """A temporary file as utils.io.atomic_write leaves it when killed mid-write."""
    path = Path(folder) / f".{name}.k9x2_q.tmp"
    path.write_bytes(os.urandom(1 << 16))
    return path


def test_ana_resume_removes_leftover_temporary_files(ana_done, ana_args, tmp_path):
    run_dir = tmp_path / "run"
    _link_copy(ana_done, run_dir)
    leftovers = [_leftover(run_dir, "last.pt"), _leftover(run_dir, "1_f1mi.pt")]
    main.main(ana_args("--loadModel", "--epoch", "2", "--saveModel"))
    assert not any(p.exists() for p in leftovers)
    log = (run_dir / "output.txt").read_text()
    assert "removed 2 temporary file(s) left by an interrupted write (a killed run): " + \
        ", ".join(sorted(str(p) for p in leftovers)) in log


def test_cryoem_resume_removes_leftover_temporary_files(cryo, tmp_path):
    out = tmp_path / "out"
    _link_copy(cryo["run_dir"], out / "done")
    leftover = _leftover(out / "done", "best_model.pt")
    cryo_entry.main(cryo_argv(cryo["config"], cryo["data"], out, "--resume", exp="done", epochs=2))
    assert not leftover.exists()
    assert f"removed 1 temporary file(s) left by an interrupted write (a killed run): {leftover}" in \
        (out / "done" / "train.log").read_text()


def test_preprocess_and_pick_remove_what_a_killed_run_left(mics, picker, tmp_path):
    out = tmp_path / "data"
    preprocess_cryoem.main(preprocess_argv(mics, out))
    stale = out / ".preprocess-killed"
    stale.mkdir()
    (stale / "chunk_000.pt").write_bytes(b"half")
    preprocess_cryoem.main(preprocess_argv(mics, out, "--overwrite"))
    assert not stale.exists()
    picks = tmp_path / "picks"
    pick_particles.main(pick_argv(picker, picks))
    leftovers = [_leftover(picks, "picks.csv"), _leftover(picks / "box", "pick_mic.box")]
    pick_particles.main(pick_argv(picker, picks))
    assert not any(p.exists() for p in leftovers)
    assert f"removed 2 temporary file(s) left by an interrupted write (a killed run): {leftovers[0]}, " \
           f"{leftovers[1]}" in (picks / "picking.log").read_text()


# ------------------------------------------------------------ 12. runs killed in their first epoch

def test_ana_load_model_after_a_kill_in_the_first_epoch_starts_afresh(ana_args, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # what a kill -9 during epoch 1 leaves: the log, args.json, a temporary file, no last.pt
    (run_dir / "output.txt").write_text("2024-01-01 00:00:00 epoch 1 train\n")
    (run_dir / "args.json").write_text('{"original": true}')
    leftover = _leftover(run_dir, "last.pt")
    result = main.main(ana_args("--loadModel", "--epoch", "1"))
    assert result["best"] and torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    log = (run_dir / "output.txt").read_text()
    assert f"no last.pt in {run_dir}: the previous attempt did not finish an epoch; starting at epoch 1" in log
    assert not leftover.exists()


def test_cryoem_resume_after_a_kill_in_the_first_epoch_starts_afresh(cryo, tmp_path):
    run_dir = tmp_path / "out" / "x"
    run_dir.mkdir(parents=True)
    shutil.copy(cryo["run_dir"] / "config.yaml", run_dir / "config.yaml")
    (run_dir / "train.log").write_text("2024-01-01 00:00:00 config {...}\n")
    result = cryo_entry.main(cryo_argv(cryo["config"], cryo["data"], tmp_path / "out", "--resume", exp="x", epochs=1))
    assert result["epochs_run"] == 1
    log = (run_dir / "train.log").read_text()
    assert f"--resume: no last.pt in {run_dir}: the previous attempt stopped before its first epoch ended; " \
           f"starting afresh at epoch 1" in log
