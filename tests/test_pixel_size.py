"""Physical units: pixel sizes from MRC headers, STAR optics blocks and --pixel-size; particle sizes
in Angstrom converted to pixels in preprocessing and picking; the pixel size in the STAR outputs."""
import logging

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from PIL import Image

import pick_particles
import preprocess_cryoem
from conftest import expect_exit_2
from datasets.micrographs import (micrograph_pixel_size, read_coordinates, resolve_pixel_size, star_pixel_size,
                                  write_csv)
from utils.errors import UserError


def _mrc(path, array, voxel_size=None):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(array, dtype=np.float32))
        if voxel_size is not None:
            mrc.voxel_size = voxel_size
    return path


def _star_with_optics(path, column="rlnMicrographPixelSize", sizes=(1.34,)):
    optics = pd.DataFrame({"rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(sizes))],
                           "rlnOpticsGroup": list(range(1, len(sizes) + 1)), column: list(sizes)})
    particles = pd.DataFrame({"rlnMicrographName": ["m1.mrc", "m1.mrc"], "rlnCoordinateX": [10.0, 30.0],
                              "rlnCoordinateY": [12.0, 40.0], "rlnOpticsGroup": [1, 1]})
    starfile.write({"optics": optics, "particles": particles}, path)
    return path


def test_pixel_size_from_an_mrc_header(tmp_path):
    rng = np.random.default_rng(0)
    assert micrograph_pixel_size(_mrc(tmp_path / "a.mrc", rng.normal(size=(20, 30)), 1.77)) == pytest.approx(1.77)
    assert micrograph_pixel_size(_mrc(tmp_path / "b.mrc", rng.normal(size=(20, 30)))) is None  # header says 0
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(tmp_path / "c.png")
    assert micrograph_pixel_size(tmp_path / "c.png") is None
    assert resolve_pixel_size([tmp_path / "a.mrc"]) == (pytest.approx(1.77), "the MRC headers")
    assert resolve_pixel_size([tmp_path / "c.png"]) == (None, "unknown")
    assert resolve_pixel_size([tmp_path / "c.png"], given=2.5) == (2.5, "--pixel-size")


def test_pixel_size_from_a_star_optics_block(tmp_path):
    star = _star_with_optics(tmp_path / "coords.star")
    assert star_pixel_size(star) == pytest.approx(1.34)
    assert star_pixel_size(_star_with_optics(tmp_path / "img.star", "rlnImagePixelSize", (3.54,))) == pytest.approx(3.54)
    df, _ = read_coordinates(star)  # the optics block does not disturb the coordinates
    assert list(df["x"]) == [10.0, 30.0]
    with pytest.raises(UserError, match="different pixel sizes"):
        star_pixel_size(_star_with_optics(tmp_path / "two.star", sizes=(1.0, 2.0)))
    # the STAR's pixel size is used for micrographs that carry none
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)).save(tmp_path / "m1.png")
    assert resolve_pixel_size([tmp_path / "m1.png"], star=star) == (pytest.approx(1.34),
                                                                     f"the optics block of {star}")


def test_different_pixel_sizes_in_one_run_are_an_error(tmp_path, caplog):
    rng = np.random.default_rng(0)
    a = _mrc(tmp_path / "a.mrc", rng.normal(size=(20, 30)), 1.0)
    b = _mrc(tmp_path / "b.mrc", rng.normal(size=(20, 30)), 2.0)
    with pytest.raises(UserError, match="one pixel size per run"):
        resolve_pixel_size([a, b])
    with caplog.at_level(logging.WARNING):
        assert resolve_pixel_size([a], given=1.5)[0] == 1.5
    assert "differs from the MRC header" in caplog.text


@pytest.fixture
def micrographs(tmp_path):
    """3 MRC micrographs 96 x 128 at 2 A/px, the same as PNG, and their particle coordinates."""
    rng = np.random.default_rng(0)
    for folder in ("mrc", "png"):
        (tmp_path / folder).mkdir()
    rows = []
    for name, n in (("mic_a", 6), ("mic_b", 5), ("mic_c", 4)):
        image = rng.normal(size=(96, 128))
        _mrc(tmp_path / "mrc" / f"{name}.mrc", image, 2.0)
        Image.fromarray(np.clip(image * 40 + 128, 0, 255).astype(np.uint8)).save(tmp_path / "png" / f"{name}.png")
        rows += [(f"{name}.mrc", 10.0 + 20 * i, 20.0 + 10 * (i % 3)) for i in range(n)]
    write_csv(tmp_path / "coords.csv", pd.DataFrame(rows, columns=["micrograph", "x", "y"]).assign(score=np.nan))
    return tmp_path


def _preprocess(mics, coords, out, *extra):
    return preprocess_cryoem.main(["--micrographs", str(mics), "--coordinates", str(coords), "--output-dir", str(out),
                                   "--patch-size", "16", "--context", "0", "--stride", "8",
                                   "--test-micrographs", "mic_c", *extra])


def test_preprocessing_takes_the_particle_diameter_in_angstrom(micrographs, capsys):
    # 32 A at 2 A/px (the MRC headers) = 16 px across: radius 8 px, as --particle-radius 8 gives
    summary = _preprocess(micrographs / "mrc", micrographs / "coords.csv", micrographs / "a", "--particle-diameter-A", "32")
    meta = summary["metadata"]
    assert meta["particle_radius"] == 8.0 and meta["pixel_size"] == pytest.approx(2.0)
    assert meta["particle_diameter_A"] == 32.0 and meta["positive_radius"] == 4.0
    pixels = _preprocess(micrographs / "mrc", micrographs / "coords.csv", micrographs / "b", "--particle-radius", "8")
    assert pixels["n_positive"] == summary["n_positive"] and pixels["n_unlabeled"] == summary["n_unlabeled"]
    assert pixels["metadata"]["prior"] == meta["prior"]
    # PNG carries no pixel size: --pixel-size gives it (4 A/px: 32 A = 8 px, radius 4)
    png = _preprocess(micrographs / "png", micrographs / "coords.csv", micrographs / "c", "--particle-diameter-A",
                      "32", "--pixel-size", "4")
    assert png["metadata"]["particle_radius"] == 4.0 and png["metadata"]["pixel_size"] == 4.0
    stderr = expect_exit_2(capsys, preprocess_cryoem, [
        "--micrographs", str(micrographs / "png"), "--coordinates", str(micrographs / "coords.csv"),
        "--output-dir", str(micrographs / "d"), "--particle-diameter-A", "32", "--test-micrographs", "mic_c"])
    assert len(stderr.splitlines()) == 1 and "--pixel-size" in stderr and not (micrographs / "d").exists()


def test_picking_pixel_size_against_the_training_data(tmp_path):
    mic = _mrc(tmp_path / "m.mrc", np.random.default_rng(0).normal(size=(64, 64)), 2.0)
    ckpt = {"data_metadata": {"pixel_size": 1.0, "downsample": 2.0}}
    with pytest.raises(UserError, match=r"trained on micrographs of 1 A/px.*--downsample 1\b"):
        pick_particles.picking_pixel_size([mic], None, ckpt, "best_model.pt")
    assert pick_particles.picking_pixel_size([mic], None, ckpt, "best_model.pt", downsample=1.0)[0] == 2.0
    assert pick_particles.picking_pixel_size([mic], None, {"data_metadata": {"pixel_size": 2.0}}, "b")[0] == 2.0
    png = tmp_path / "m.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    size, note = pick_particles.picking_pixel_size([png], None, ckpt, "b")
    assert size == 1.0 and "the training data's" in note
    assert pick_particles.picking_pixel_size([png], None, {}, "b") == (None, "")
