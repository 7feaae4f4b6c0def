"""Shared fixtures: tiny generated ANA data and the CPU-sized CLI arguments."""
import shutil
from pathlib import Path

import pytest

from datasets.synthetic_ana import generate_ana_demo

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
        return ["--annFile", str(tiny_ana / "annotations.csv"), "--imageDir", str(tiny_ana / "images"),
                "--numClasses", "4", "--arch", "resnet18", "--imageSize", "32", "--tileSize", "128",
                "--no-pretrained", "--numWorkers", "0", "--trainBatchSize", "8", "--testBatchSize", "16",
                "--cacheDir", str(tmp_path / "cache"), "--pathModelParams", str(tmp_path / run), *extra]

    return make
