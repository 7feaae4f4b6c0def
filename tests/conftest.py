"""Shared fixtures: tiny generated ANA data and the CPU-sized CLI arguments."""
import shutil
from pathlib import Path

import pytest

from datasets.synthetic_ana import generate_ana_demo

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_argv(data, run_dir, cache, *extra):
    """CPU-sized ``main.py`` argv for a tiny dataset in ``data`` (4 classes, 128 px tiles)."""
    return ["--annFile", str(data / "annotations.csv"), "--imageDir", str(data / "images"),
            "--numClasses", "4", "--arch", "resnet18", "--imageSize", "32", "--tileSize", "128",
            "--no-pretrained", "--numWorkers", "0", "--trainBatchSize", "8", "--testBatchSize", "16",
            "--cacheDir", str(cache), "--pathModelParams", str(run_dir), *extra]


@pytest.fixture(scope="session")
def tiny_ana_master(tmp_path_factory):
    """A tiny MIML dataset (4 classes, 128 px tiles, 2x2 tiles per image), generated once."""
    root = tmp_path_factory.mktemp("ana_master")
    generate_ana_demo(root, n_train=12, n_val=4, n_test=4, tiles_x=2, tiles_y=2, tile_size=128,
                      num_classes=4, max_labels=3, seed=1)
    return root


@pytest.fixture
def tiny_ana(tiny_ana_master, tmp_path):
    """A private copy of the tiny dataset (tests may corrupt it) in ``tmp_path/data``."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_ana_master, dst)
    return dst


@pytest.fixture
def ana_args(tiny_ana, tmp_path):
    """Build CPU-sized ``main.py`` argv for the tiny dataset; extra flags are appended."""

    def make(*extra, run="run"):
        return cpu_argv(tiny_ana, tmp_path / run, tmp_path / "cache", *extra)

    return make


def expect_exit_2(capsys, entry, argv):
    """Run ``entry.main(argv)``: exit code 2 and no traceback; return stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        entry.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err


def expect_error_line(capsys, entry, argv, only=False):
    """Run ``entry.main(argv)``: exit code 2, no traceback, one ``error: ...`` line, the last on
    stderr (after any log lines; ``only``: stderr holds nothing else); return it."""
    err = expect_exit_2(capsys, entry, argv)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert not only or len(err.strip().splitlines()) == 1, err
    return errors[0]


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder in which this process cannot create a file (root ignores file modes: then /sys)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for candidate in (folder, Path("/sys/kernel")):
            try:
                (candidate / ".probe").touch()
                (candidate / ".probe").unlink()
            except OSError:
                yield candidate
                return
        pytest.skip("no folder that this user cannot write to")
    finally:
        folder.chmod(0o755)
