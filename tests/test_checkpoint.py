"""utils.checkpoint: atomic writes keep the old file on failure and get the usual file mode."""
import os
import stat

import pytest
import torch

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.io import atomic_write


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


def test_load_checkpoint_names_what_a_file_of_another_kind_is(tmp_path):
    from utils.checkpoint import checkpoint_kind
    save_checkpoint({"epoch": 1, "student": {}, "teacher": {}, "scheduler": {}, "optimizer": {}}, tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"--resume .*c.pt is a CryoEM run state \(last.pt of "
                                        r"train_pu_selective_fixmatch.py\); expected an ANA run state"):
        load_checkpoint(tmp_path / "c.pt", expected=("ana-run",), flag="--resume")
    assert load_checkpoint(tmp_path / "c.pt", expected=("cryoem-run",), mmap=True)["epoch"] == 1
    save_checkpoint({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1000, 2)}, tmp_path / "in.pt")
    save_checkpoint({"state_dict": {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(4, 2)}}, tmp_path / "w.pt")
    assert checkpoint_kind(load_checkpoint(tmp_path / "in.pt")) == "imagenet"
    assert checkpoint_kind(load_checkpoint(tmp_path / "w.pt")) == "ana-model"
    save_checkpoint({"a": 1, "b": 2}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"is a checkpoint of unknown kind \(keys: a, b\); expected a CryoEM best"):
        load_checkpoint(tmp_path / "other.pt", expected=("cryoem-best",))
    with pytest.raises(UserError, match=r"is a folder; expected a checkpoint file"):
        load_checkpoint(tmp_path)


def test_a_pickle_that_a_safe_load_refuses_is_named(tmp_path):
    import fractions
    torch.save({"epoch": fractions.Fraction(1, 3)}, tmp_path / "obj.pt")  # any class outside the safe list
    with pytest.raises(UserError, match=r"obj.pt cannot be read: it holds Python objects that a safe "
                                        r"\(weights-only\) load refuses"):
        load_checkpoint(tmp_path / "obj.pt")


def test_leftover_temporary_files_are_removed_and_named(tmp_path):
    from utils.checkpoint import remove_leftover_temp_files
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "keep.tmp").write_text("not ours: no leading dot")
    (tmp_path / ".hidden").write_text("no .tmp suffix")
    assert remove_leftover_temp_files(tmp_path) == [".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "keep.tmp"]
