"""Stops from outside and full disks, for every command that holds a run lock.

* SIGTERM (how Slurm, Kubernetes and ``timeout`` stop a job) and SIGHUP (a closed terminal) end a
  command as Ctrl-C does: one ``interrupted: ...`` line with the command that goes on (in the
  terminal, and in the run's log for the trainers), the lock released, exit code 128 + the signal's
  number, and the last completed epoch as the resume point;
* Ctrl-C or SIGTERM while a checkpoint is being written: the write finishes, then the one line;
* a write that finds the disk full leaves the previous files as they were and ends with one line
  naming the file and the free space (the full disk is simulated: ``ENOSPC`` from the write).

Real signals: the trainers run in a child process that sends the signal to itself at a chosen
moment (mid-way through writing ``last.pt``, or at the start of an epoch), or from outside to the
whole process group as a scheduler does; the short commands get it in-process.
"""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pick_particles
import preprocess_cryoem
import rethreshold_picks
import train_pu_selective_fixmatch as cryo_entry
import utils.io
from conftest import cpu_argv, expect_error_line
from test_cryoem_preprocess import tiny_micrographs  # noqa: F401 (a fixture, used through mics)
from test_cryoem_train import _argv as cryo_argv
from test_main_cli import _link_copy
from test_robustness import cryo, mics, pick_argv, picker, preprocess_argv, shared, tree  # noqa: F401 (fixtures)
from utils.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.run_lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]

# A child process that runs ``<module>.main(argv)`` and sends itself ``signal`` at a chosen moment:
# ``save:<epoch>``: on the third write of torch.save into last.pt of that epoch (inside the zip
# writer); ``epoch:<module>:<function>:<n>``: when the run's per-epoch function is called the n-th time.
CHILD = r"""
import json, os, signal, sys
import torch
entry, signum, moment, argv = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3].split(":"), json.loads(sys.argv[4])
if moment[0] == "save":
    real_save = torch.save

    class SignalMidWrite:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                os.kill(os.getpid(), signum)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj and obj.get("epoch") == int(moment[1]):
            f = SignalMidWrite(f)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
else:
    import importlib
    module = importlib.import_module(moment[1])
    real_epoch, calls = getattr(module, moment[2]), []

    def epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(moment[3]):
            os.kill(os.getpid(), signum)
        return real_epoch(*args, **kwargs)

    setattr(module, moment[2], epoch)
__import__(entry).main(argv)
"""


def _child(entry, signame, moment, argv, cwd):
    # SIGINT as a terminal delivers it, also when pytest runs as a background job (whose children
    # start with SIGINT ignored)
    return subprocess.run([sys.executable, "-c", CHILD, entry, signame, moment, json.dumps(argv)], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stopped(proc, code, what):
    """The last stderr line of a stopped child: exit ``code``, no traceback, ``interrupted: stopped by <what>``."""
    err = proc.stderr
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"interrupted: stopped by {what} "), err[-3000:]
    return line


def _epoch(path):
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def _no_leftovers(folder):
    folder = Path(folder)
    assert not (folder / LOCK_NAME).exists()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def _resume_argv(line, script):
    import shlex
    words = shlex.split(line.split(": ", 2)[-1])
    assert Path(words[1]).name == script, words
    return words[2:]


# ------------------------------------------------------------------ stops during a checkpoint write

def test_ctrl_c_while_ana_writes_last_pt_finishes_the_write_then_one_line(tiny_ana, tmp_path):
    run_dir = tmp_path / "run"
    argv = cpu_argv(tiny_ana, run_dir, tmp_path / "cache", "--epoch", "2")
    proc = _child("main", "SIGINT", "save:1", argv, ROOT)
    line = _stopped(proc, 130, "Ctrl-C")
    assert f"after epoch 1 of 2 (saved in {run_dir / 'last.pt'}); to resume: " in line, line
    assert line in (run_dir / "output.txt").read_text()
    assert _epoch(run_dir / "last.pt") == 1  # the interrupted write completed
    _no_leftovers(run_dir)


def test_sigterm_while_cryoem_writes_last_pt_finishes_the_write_then_one_line(cryo, tmp_path):
    run_dir = tmp_path / "out" / "x"
    argv = cryo_argv(cryo["config"], cryo["data"], tmp_path / "out", exp="x", epochs=2)
    proc = _child("train_pu_selective_fixmatch", "SIGTERM", "save:1", argv, ROOT)
    line = _stopped(proc, 143, "SIGTERM")
    assert f"after epoch 1 of 2 (saved in {run_dir / 'last.pt'}); to resume: " in line, line
    assert line in (run_dir / "train.log").read_text()
    assert _epoch(run_dir / "last.pt") == 1
    _no_leftovers(run_dir)


# ------------------------------------------------------------------ SIGTERM / SIGHUP in the trainers

def test_sighup_in_cryoem_epoch_2_says_where_and_the_command_resumes(cryo, tmp_path):
    run_dir = tmp_path / "out" / "x"
    argv = cryo_argv(cryo["config"], cryo["data"], tmp_path / "out", exp="x", epochs=2)
    proc = _child("train_pu_selective_fixmatch", "SIGHUP", "epoch:train_pu_selective_fixmatch:train_one_epoch:2", argv, ROOT)
    line = _stopped(proc, 129, "SIGHUP")
    assert f"after epoch 1 of 2 (saved in {run_dir / 'last.pt'}); to resume: " in line, line
    assert line in (run_dir / "train.log").read_text()
    assert _epoch(run_dir / "last.pt") == 1
    _no_leftovers(run_dir)
    resume = _resume_argv(line, "train_pu_selective_fixmatch.py")
    assert resume == argv + ["--resume"]
    assert cryo_entry.main(resume)["epochs_run"] == 2


def test_a_scheduler_sigterm_to_the_whole_job_ends_main_py_in_one_line(tiny_ana, tmp_path):
    """SIGTERM to every process of the job (the main process and its DataLoader workers), as Slurm
    sends it at the time limit: one line, exit 143, no traceback from PyTorch about its workers."""
    run_dir = tmp_path / "run"
    argv = cpu_argv(tiny_ana, run_dir, tmp_path / "cache", "--epoch", "500", "--patience", "0")
    argv[argv.index("--numWorkers") + 1] = "2"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "last.pt").exists():  # an epoch is saved: the run is in its epoch loop
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    line = _stopped(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), 143, "SIGTERM")
    epoch = _epoch(run_dir / "last.pt")
    assert f"after epoch {epoch} of 500 (saved in {run_dir / 'last.pt'}); to resume: " in line, line
    assert line.endswith("--loadModel")
    assert line in (run_dir / "output.txt").read_text()
    _no_leftovers(run_dir)


# ------------------------------------------------------------------ the commands without epochs

def _signal_inside(monkeypatch, module, name, signum):
    """Make ``module.<name>`` send ``signum`` to this process (a real signal, handled in-process)."""
    def signalled(*args, **kwargs):
        # 831c149 had no handler: the default action would end pytest itself
        assert signal.getsignal(signum) not in (signal.SIG_DFL, None), f"no handler for {signum!r}"
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError(f"{signum!r} did not stop the command")

    monkeypatch.setattr(module, name, signalled)


def _stopped_in_process(capsys, entry, argv, code, what, script):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        entry.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"interrupted: stopped by {what}; to run it again: ") and script in line, line
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are given back
    return line


def _without_log(files):
    """A folder's tree without picking.log, which every run appends to."""
    return {name: digest for name, digest in files.items() if name != "picking.log"}


def test_sigterm_in_preprocessing_leaves_the_folder_as_it_was(mics, tmp_path, capsys, monkeypatch):
    out = tmp_path / "data"
    preprocess_cryoem.main(preprocess_argv(mics, out))
    before = tree(out)
    _signal_inside(monkeypatch, preprocess_cryoem, "read_micrograph", signal.SIGTERM)
    _stopped_in_process(capsys, preprocess_cryoem, preprocess_argv(mics, out, "--overwrite"), 143, "SIGTERM",
                        "preprocess_cryoem.py")
    assert tree(out) == before  # no temporary folder, no lock file, the earlier data intact


def test_sighup_in_picking_leaves_the_folder_as_it_was(picker, tmp_path, capsys, monkeypatch):
    out = tmp_path / "picks"
    pick_particles.main(pick_argv(picker, out))
    before = tree(out)
    _signal_inside(monkeypatch, pick_particles, "pick_micrograph", signal.SIGHUP)
    line = _stopped_in_process(capsys, pick_particles, pick_argv(picker, out), 129, "SIGHUP", "pick_particles.py")
    assert _without_log(tree(out)) == _without_log(before)
    assert (out / "picking.log").read_text().strip().endswith(line)  # the log says it too


def test_sigterm_in_rethresholding_leaves_the_folder_as_it_was(picker, tmp_path, capsys, monkeypatch):
    out = tmp_path / "picks"
    pick_particles.main(pick_argv(picker, out))
    before = tree(out)
    _signal_inside(monkeypatch, rethreshold_picks, "write_picks", signal.SIGTERM)
    line = _stopped_in_process(capsys, rethreshold_picks, ["--picks", str(out), "--threshold", "0.5"], 143,
                               "SIGTERM", "rethreshold_picks.py")
    assert _without_log(tree(out)) == _without_log(before)
    assert (out / "picking.log").read_text().strip().endswith(line)


def test_an_ignored_sighup_stays_ignored(picker, tmp_path, monkeypatch):
    """``nohup`` ignores SIGHUP: the command must not start handling it."""
    seen = []
    monkeypatch.setattr(pick_particles, "_pick", lambda *a, **k: seen.append(signal.getsignal(signal.SIGHUP)))
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        pick_particles.main(pick_argv(picker, tmp_path / "picks"))
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert seen == [signal.SIG_IGN]


# ------------------------------------------------------------------ a full disk

FREE = r"\(\d+(\.\d)? (bytes|KiB|MiB|GiB) written when the disk was full, \d+(\.\d)? (bytes|KiB|MiB|GiB) free in "


def _full_disk_after(monkeypatch, nbytes):
    """Every file object ``atomic_write`` writes to fails with ENOSPC once ``nbytes`` are written
    (torch.save then reports a RuntimeError of its zip writer, with the OSError as its context)."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > nbytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(utils.io.os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))


def test_a_full_disk_during_save_checkpoint_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.zeros(10)}, path)
    before = path.read_bytes()
    _full_disk_after(monkeypatch, 100)
    with pytest.raises(UserError) as exc:
        save_checkpoint({"epoch": 2, "w": torch.ones(10_000)}, path)
    message = str(exc.value)
    assert message.startswith(f"{path}: cannot be written: no space left on device ") and re.search(FREE, message)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_a_full_disk_at_fsync_is_one_line_too(tmp_path, monkeypatch):
    """Delayed allocation: the disk is found full when the data are flushed."""
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.io.os, "fsync", full)
    with pytest.raises(UserError, match=r"results.json: cannot be written: no space left on device"):
        utils.io.write_json(tmp_path / "results.json", {"a": 1})
    assert os.listdir(tmp_path) == []


def test_a_full_disk_when_cryoem_saves_last_pt_ends_in_one_line(cryo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _link_copy(cryo["run_dir"], out / "done")
    last = out / "done" / "last.pt"
    before = last.read_bytes()
    _full_disk_after(monkeypatch, 4096)
    line = expect_error_line(capsys, cryo_entry, cryo_argv(cryo["config"], cryo["data"], out, "--resume", exp="done",
                                                           epochs=2))
    assert re.search(r"error: .*done/(best_model|last)\.pt: cannot be written: no space left on device " + FREE, line)
    assert last.read_bytes() == before and _epoch(last) == 1
    assert line in (out / "done" / "train.log").read_text()
    _no_leftovers(out / "done")


def test_a_full_disk_when_picking_names_the_output_file_and_keeps_the_old_picks(picker, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "picks"
    pick_particles.main(pick_argv(picker, out))
    before = tree(out)
    _full_disk_after(monkeypatch, 10)
    line = expect_error_line(capsys, pick_particles, pick_argv(picker, out, "--threshold", "0.2"))
    assert re.search(rf"error: {re.escape(str(out))}/[^ ]+: cannot be written: no space left on device " + FREE, line)
    assert "/.pick" not in line  # the file's place in --output-dir, not the temporary folder's
    assert _without_log(tree(out)) == _without_log(before)
