"""utils.checkpoint: atomic writes keep the old file on failure and get the usual file mode."""
import os
import stat

import pytest
import torch

from utils.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from utils.errors import UserError


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fail(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail, mode="w")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_written_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda f: f.write("x"), mode="w")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_checkpoint_round_trip_and_bad_file(tmp_path):
    save_checkpoint({"w": torch.arange(3), "epoch": 2}, tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.arange(3))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt cannot be read"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
