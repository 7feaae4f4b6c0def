"""utils/run_lock.py: one process per directory; the holder is named; stale locks are taken over.

The holder runs in a subprocess: POSIX record locks do not conflict within one process.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utils.errors import UserError
from utils.run_lock import LOCK_NAME, RunLock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = ("import sys, time\n"
          "from utils.run_lock import RunLock\n"
          "lock = RunLock(sys.argv[1])\n"
          "lock.acquire()\n"
          "print('locked', flush=True)\n"
          "time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds ``tmp_path/run.lock``; yields a function that starts it for a folder."""
    procs = []

    def start(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def dead_pid():
    """The pid of a process that has just ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_record(folder, **record):
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(),
                                                "started": "2024-01-01 00:00:00", "command": "old run", **record}))


def test_a_second_process_is_refused_with_the_holder_named(tmp_path, holder):
    proc = holder(tmp_path)
    for attempt in (RunLock(tmp_path, hint="or use another folder").acquire, RunLock(tmp_path).check):
        with pytest.raises(UserError) as info:
            attempt()
        message = str(info.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message, message
        assert str(tmp_path / LOCK_NAME) in message and "\n" not in message
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # the holder's record is intact


def test_a_lock_of_a_killed_process_is_taken_over(tmp_path, holder):
    proc = holder(tmp_path)
    proc.send_signal(signal.SIGKILL)  # kill -9: no clean-up, the file stays
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).check()  # no live holder: nothing to refuse
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note.startswith(f"took over the stale lock {tmp_path / LOCK_NAME} of pid {proc.pid} on host")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_fresh_lock_has_no_note_and_is_removed_on_release(tmp_path):
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    lock.release()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_pid_on_this_host_is_stale(tmp_path):
    write_record(tmp_path)
    lock = RunLock(tmp_path)
    assert "took over the stale lock" in lock.acquire()
    lock.release()


def test_a_lock_from_another_host_is_refused(tmp_path):
    write_record(tmp_path, host="another-node", pid=12345)
    with pytest.raises(UserError, match=r"pid 12345 on host another-node .*cannot be checked from this host; "
                                        r"delete the lock file if that run has ended"):
        RunLock(tmp_path).acquire()
    with pytest.raises(UserError, match="another-node"):
        RunLock(tmp_path).check()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "another-node"


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked: once the parent is gone the directory must be free."""
    code = ("import os, sys, time\n"
            "from utils.run_lock import RunLock\n"
            "RunLock(sys.argv[1]).acquire()\n"
            "if os.fork() == 0:\n"
            "    time.sleep(60); os._exit(0)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        proc.kill()  # the parent only; its forked child lives on
        proc.wait()
        lock = RunLock(tmp_path)
        assert "took over" in lock.acquire()
        lock.release()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


def test_a_lock_file_that_cannot_be_opened_is_a_user_error(tmp_path):
    (tmp_path / LOCK_NAME).mkdir()  # e.g. a folder in its place (a file of another user is the same error)
    with pytest.raises(UserError, match=r"lock file .*run.lock cannot be opened for writing \(Is a directory\)"):
        RunLock(tmp_path).acquire()


def test_without_record_locks_the_pid_in_the_record_decides(tmp_path, monkeypatch):
    """A file system without POSIX locks (lockf fails with ENOLCK): a live pid of this host holds
    the directory, a dead one is stale."""
    import errno

    import utils.run_lock as run_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "lockf", no_locks)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_record(tmp_path, pid=sleeper.pid)
        with pytest.raises(UserError, match=f"pid {sleeper.pid} on host"):
            RunLock(tmp_path).check()
        with pytest.raises(UserError, match=f"pid {sleeper.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(tmp_path)
    assert f"of pid {sleeper.pid} on host" in lock.acquire()  # its process has ended: stale
    lock.release()


# ------------------------------------------------------------------------- utils/run.py: run_frame
from types import SimpleNamespace  # noqa: E402

from utils.interrupt import Interrupted  # noqa: E402
from utils.run import Staging, claim_run_dir, run_frame  # noqa: E402


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")) if Path(folder).exists() else []


def _log(folder, name="run.log"):
    return [line.split(" ", 2)[2] for line in (Path(folder) / name).read_text().splitlines()]


def test_claim_run_dir_refuses_a_held_folder_and_the_frame_writes_nothing(tmp_path, holder):
    out = tmp_path / "out"
    out.mkdir()
    proc = holder(out)
    with pytest.raises(UserError, match=f"pid {proc.pid} on host .*or choose another --output-dir"):
        claim_run_dir(out, "--output-dir", hint="or choose another --output-dir")
    before = _files(out)
    with pytest.raises(UserError, match=f"pid {proc.pid} on host"):
        with run_frame(out, RunLock(out), "run.log", staging=Staging(out)):
            raise AssertionError("the block must not run")
    assert _files(out) == before == [LOCK_NAME]  # no log, no staging folder; the holder's lock intact
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid


def test_claim_run_dir_checks_the_sub_folders(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "box").write_text("a file where a folder goes")
    with pytest.raises(UserError, match="--output-dir"):
        claim_run_dir(out, "--output-dir", folders=[out / "box"])
    claim_run_dir(out, "--output-dir")  # the folder itself is fine


def test_the_frame_logs_the_header_and_what_a_killed_run_left(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_record(out)  # a stale lock
    (out / ".stage-old").mkdir()  # a staging folder of a killed run
    (out / ".x.abc.tmp").write_text("half written")  # a temporary file of a killed write
    staging = Staging(out)
    with run_frame(out, RunLock(out), "run.log", name="frame-test", header="header line", staging=staging) as log:
        log.info("working")
        staging.path("sub/result.txt").write_text("new")
        assert staging.tmp.parent == out and staging.tmp.name.startswith(".stage-")
        staging.install()
    lines = _log(out)
    assert lines[0] == "header line"
    assert lines[1].startswith(f"took over the stale lock {out / LOCK_NAME}")
    assert lines[2].startswith("removed 1 temporary file(s)") and ".x.abc.tmp" in lines[2]
    assert lines[3:] == ["removed the temporary folder(s) of an interrupted run: .stage-old", "working"]
    assert _files(out) == ["run.log", "sub", "sub/result.txt"]  # installed; no lock, no staging folder


def test_a_user_error_is_logged_in_one_line_and_the_previous_files_stay(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.txt").write_text("previous run")
    staging = Staging(out)
    with pytest.raises(UserError) as info:
        with run_frame(out, RunLock(out), "run.log", name="frame-test", staging=staging):
            staging.path("result.txt").write_text("half of a new run")
            raise UserError(f"{staging.tmp / 'result.txt'}: no space left\non device")
    assert str(info.value) == f"{out / 'result.txt'}: no space left\non device"  # its real place
    assert _log(out) == [f"error: {staging.tmp / 'result.txt'}: no space left on device"]
    assert "error:" not in capsys.readouterr().err  # the entry point prints it, once
    assert _files(out) == ["result.txt", "run.log"] and (out / "result.txt").read_text() == "previous run"


def test_ctrl_c_writes_the_interrupted_line_and_releases(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with run_frame(out, RunLock(out), "run.log", name="frame-test", staging=Staging(out),
                       rerun=("pick_particles.py", ["--output-dir", "out"])):
            raise KeyboardInterrupt
    line = _log(out)[-1]
    assert line.startswith("interrupted: stopped by Ctrl-C; to run it again: ") and line.endswith(
        "pick_particles.py --output-dir out")
    assert _files(out) == ["run.log"]
    RunLock(out).acquire()  # released


def test_a_trainer_stop_is_raised_as_its_resume_line(tmp_path):
    out = tmp_path / "out"
    stop = Interrupted("stopped by Ctrl-C after epoch 3 of 9; to resume: python main.py --loadModel")
    with pytest.raises(Interrupted) as info:
        with run_frame(out, RunLock(out), "output.txt", resume=lambda exc: stop):
            raise KeyboardInterrupt
    assert info.value is stop
    assert _log(out, "output.txt") == [f"interrupted: {stop}"]
    assert not (out / LOCK_NAME).exists()


def test_any_exception_releases_the_lock_and_a_new_empty_folder_goes(tmp_path):
    out = tmp_path / "new"
    lock = RunLock(out)
    with pytest.raises(RuntimeError):
        with run_frame(out, lock, None, staging=Staging(out)):  # no log file: the terminal only
            assert (out / LOCK_NAME).exists()
            raise RuntimeError("a bug")
    assert not out.exists()  # created by the failed run, left empty: removed
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError):
        with run_frame(kept, RunLock(kept), None):
            raise RuntimeError("a bug")
    assert kept.is_dir() and _files(kept) == []  # it was there before: stays


def test_other_processes_of_a_torchrun_write_nothing(tmp_path):
    out = tmp_path / "out"
    info = SimpleNamespace(enabled=False, is_main=False, rank=1, world_size=2)
    with run_frame(out, RunLock(out), "run.log", info=info, header="header") as log:
        log.info("not written")
    assert not out.exists()
