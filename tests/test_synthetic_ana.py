"""Tests of the synthetic ANA MIML generator and of make_demo_data.py (small, fast settings)."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import make_demo_data
from datasets.synthetic_ana import CLASS_NAMES, _plan_labels, _plan_tiles, generate_ana_demo

SMALL = dict(n_train=8, n_val=4, n_test=4, tiles_x=2, tiles_y=2, tile_size=64,
             num_classes=4, max_labels=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("ana")
    csv = generate_ana_demo(out, seed=0, **SMALL)
    return out, pd.read_csv(csv, dtype=str)


def _labels(s):
    return set(map(int, s.split()))


def test_class_names():
    assert CLASS_NAMES[0] == "golgi" and CLASS_NAMES[7] == "speckled" and len(CLASS_NAMES) == 8


def test_csv_columns_and_targets(demo):
    out, df = demo
    assert list(df.columns) == ["path", "TARGET", "Split", "TILE_TARGETS"]
    assert df["Split"].value_counts().to_dict() == {"train": 8, "val": 4, "test": 4}
    for t in df["TARGET"]:
        idx = [int(x) for x in t.split()]
        assert idx == sorted(set(idx)) and 1 <= len(idx) <= 3
        assert all(0 <= i < 4 for i in idx)
    n_labels = df["TARGET"].str.split().str.len()
    assert (n_labels == 1).any() and (n_labels > 1).any()  # a mix of single and multi


def test_images_size_mode_and_green(demo):
    out, df = demo
    for name in df["path"]:
        im = Image.open(out / "images" / name)
        assert im.mode == "RGB" and im.size == (128, 128)
        a = np.asarray(im, np.float64)
        r, g, b = a[..., 0].mean(), a[..., 1].mean(), a[..., 2].mean()
        assert g > 5 * max(r, b) and g > 5  # fluorescence lives in the green channel
        assert a[..., 1].max() > 100  # cells are bright on a dark background


def test_every_class_in_every_split(demo):
    _, df = demo
    for split, part in df.groupby("Split"):
        seen = set().union(*map(_labels, part["TARGET"]))
        assert seen == set(range(4)), split


def test_tiles_are_miml_subsets(demo):
    _, df = demo
    partial = False
    for target, tiles in zip(df["TARGET"], df["TILE_TARGETS"]):
        bag = _labels(target)
        tile_sets = [_labels(t) for t in tiles.split(";")]
        assert len(tile_sets) == 4
        assert all(t and t <= bag for t in tile_sets)
        assert set().union(*tile_sets) == bag
        if len(bag) > 1:
            assert any(t < bag for t in tile_sets)
            partial = True
    assert partial


def test_label_and_tile_plans_many_draws():
    """The invariants hold for every draw, not just the ones the small demo happens to hit."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        c = int(rng.integers(1, 9))
        m = int(rng.integers(1, c + 1))
        n = int(rng.integers(-(-c // m), 12))
        labels = _plan_labels(n, c, m, rng)
        assert len(labels) == n and set().union(*map(set, labels)) == set(range(c))
        assert all(1 <= len(y) <= m and y == sorted(set(y)) for y in labels)
        n_tiles = int(rng.integers(2, 5))
        for y in labels:
            tiles = [set(t) for t in _plan_tiles(y, n_tiles, rng)]
            assert all(t and t <= set(y) for t in tiles) and set().union(*tiles) == set(y)
            assert len(y) == 1 or any(t < set(y) for t in tiles)


def test_deterministic(tmp_path):
    a = generate_ana_demo(tmp_path / "a", seed=3, **SMALL)
    b = generate_ana_demo(tmp_path / "b", seed=3, **SMALL)
    c = generate_ana_demo(tmp_path / "c", seed=4, **SMALL)
    assert a.read_bytes() == b.read_bytes()
    def png(csv, name):
        return (csv.parent / "images" / name).read_bytes()

    names = pd.read_csv(a)["path"]
    assert all(png(a, n) == png(b, n) for n in names)
    assert a.read_bytes() != c.read_bytes() and png(a, names[0]) != png(c, names[0])


@pytest.mark.parametrize("kw", [dict(n_val=1), dict(n_test=0), dict(max_labels=5),
                                dict(num_classes=9), dict(tile_size=16)])
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(ValueError):
        generate_ana_demo(tmp_path, **{**SMALL, **kw})


def test_too_few_images_message(tmp_path):
    with pytest.raises(ValueError, match="'val' has 1 images but needs at least 2"):
        generate_ana_demo(tmp_path, **{**SMALL, "n_val": 1})


def test_single_tile_and_single_label(tmp_path):
    csv = generate_ana_demo(tmp_path, n_train=4, n_val=4, n_test=4, tiles_x=1, tiles_y=1,
                            tile_size=48, num_classes=3, max_labels=1)
    df = pd.read_csv(csv, dtype=str)
    assert (df["TARGET"] == df["TILE_TARGETS"]).all()
    assert Image.open(tmp_path / "images" / df["path"][0]).size == (48, 48)


CLI = ["--family", "ana", "--nTrain", "3", "--nVal", "3", "--nTest", "3", "--tileSize", "48"]


def test_main_writes_marker_and_skips_second_run(tmp_path, capsys):
    out = tmp_path / "data"
    csv = make_demo_data.main(["--out", str(out), *CLI])
    assert csv == out / "annotations.csv" and (out / ".ana_demo").exists()
    df = pd.read_csv(csv)
    assert len(df) == 9 and all((out / "images" / p).exists() for p in df["path"])
    assert Image.open(out / "images" / df["path"][0]).size == (96, 96)
    mtime = csv.stat().st_mtime_ns
    capsys.readouterr()
    assert make_demo_data.main(["--out", str(out), *CLI]) == csv
    assert "already there" in capsys.readouterr().out
    assert csv.stat().st_mtime_ns == mtime
    before = csv.read_bytes()
    make_demo_data.main(["--out", str(out), *CLI, "--seed", "1"])  # other args: rebuilt
    assert "Wrote ANA demo" in capsys.readouterr().out and csv.read_bytes() != before
    assert json.loads((out / ".ana_demo").read_text())["seed"] == 1


def test_main_refuses_foreign_csv(tmp_path, capsys):
    foreign = tmp_path / "annotations.csv"
    foreign.write_text("path,TARGET,Split\nmine.png,0,train\n")
    with pytest.raises(SystemExit) as e:
        make_demo_data.main(["--out", str(tmp_path), *CLI])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "--force" in err and "Traceback" not in err
    assert foreign.read_text() == "path,TARGET,Split\nmine.png,0,train\n"
    assert not (tmp_path / ".ana_demo").exists()
    make_demo_data.main(["--out", str(tmp_path), *CLI, "--force"])
    assert len(pd.read_csv(foreign)) == 9


def test_main_bad_sizes_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_demo_data.main(["--out", str(tmp_path), "--nVal", "1", "--tileSize", "48"])
    assert e.value.code == 2 and "needs at least" in capsys.readouterr().err


def test_main_single_label_family(tmp_path, capsys):
    out = tmp_path / "data"
    csv = make_demo_data.main(["--out", str(out), "--family", "ana_single", "--nTrain", "8", "--nVal", "8",
                               "--nTest", "8", "--tileSize", "48"])
    assert csv == out / "ana_single" / "annotations.csv" and (out / "ana_single" / ".ana_demo").exists()
    assert not (out / "annotations.csv").exists()  # only the family asked for
    df = pd.read_csv(csv, dtype=str)
    assert len(df) == 24 and (df["TARGET"].str.split().map(len) == 1).all()
    for split in ("train", "val", "test"):  # every class in every split
        assert set(df.loc[df["Split"] == split, "TARGET"].astype(int)) == set(range(8))
    with pytest.raises(SystemExit) as e:
        make_demo_data.main(["--out", str(tmp_path / "x"), "--family", "all", "--nTrain", "3", "--tileSize", "48"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --family ana_single:") and "needs at least 8" in err
