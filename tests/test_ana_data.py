"""Annotations, tiling, the tile cache, bag pooling, results.json and early stopping."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import datasets.ana as ana
from datasets.ana import CachedTileDataset, build_tile_cache, build_tileset, read_annotations
from utils.ana.epoch import bag_max
from utils.early_stopping import EarlyStopping
from utils.errors import UserError
from utils.io import ResultsFile


def _write_images(tmp_path, sizes):
    rows = []
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"im{i}.png")
        rows.append({"path": f"im{i}.png", "TARGET": "0 2" if i % 2 else "1", "Split": "train"})
    csv = tmp_path / "ann.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_tiling_drops_border_and_keeps_bag_ids(tmp_path):
    csv = _write_images(tmp_path, [(100, 70), (64, 64)])  # 3x2 and 2x2 tiles of 32
    df, c = read_annotations(csv, None)
    assert c == 3 and df["labels"].tolist() == [[1], [0, 2]]
    tiles = build_tileset(df, "train", tmp_path / "img", c, tile_size=32)
    assert len(tiles) == 6 + 4
    assert tiles.tile_bag.tolist() == [0] * 6 + [1] * 4
    assert tiles.boxes[:3].tolist() == [[0, 0, 32, 32], [32, 0, 64, 32], [64, 0, 96, 32]]
    assert tiles.boxes[5].tolist() == [64, 32, 96, 64]  # the 4-pixel right and 6-pixel bottom borders are dropped
    assert torch.equal(tiles.tile_labels[7], torch.tensor([1.0, 0.0, 1.0]))


def test_tile_cache_content_and_single_decode(tmp_path, monkeypatch):
    csv = _write_images(tmp_path, [(64, 64), (96, 64)])
    df, c = read_annotations(csv, 3)
    tiles = build_tileset(df, "train", tmp_path / "img", c, tile_size=32)
    calls = []
    real = ana._decode_tiles
    monkeypatch.setattr(ana, "_decode_tiles", lambda *a: calls.append(a[0]) or real(*a))
    path = build_tile_cache(tiles, 16, tmp_path / "cache")
    assert sorted(calls) == sorted(set(tiles.image_paths))  # each image decoded exactly once
    ds = CachedTileDataset(path)
    tile, idx = ds[4]  # image 1, first tile
    src = np.asarray(Image.open(tmp_path / "img" / "im1.png").convert("RGB").crop((0, 0, 32, 32)).resize((16, 16), Image.BILINEAR))
    assert idx == 4 and tile.shape == (3, 16, 16) and torch.equal(tile, torch.from_numpy(src.copy()).permute(2, 0, 1))
    calls.clear()
    assert build_tile_cache(tiles, 16, tmp_path / "cache") == path and calls == []  # reused, nothing decoded
    assert build_tile_cache(tiles, 8, tmp_path / "cache") != path  # another size is another cache


def test_pretiled_csv_uses_bag_column(tmp_path):
    csv = _write_images(tmp_path, [(40, 40), (40, 40), (40, 40)])
    df = pd.read_csv(csv)
    df["TARGET"] = ["1", "1", "0 2"]
    df["bag"] = ["A", "A", "B"]
    df.to_csv(csv, index=False)
    frame, c = read_annotations(csv, 3, bag_column="bag")
    tiles = build_tileset(frame, "train", tmp_path / "img", c, tile_size=448, bag_column="bag")
    assert len(tiles) == 3 and len(tiles.bags) == 2 and tiles.tile_bag.tolist() == [0, 0, 1]
    assert (tiles.boxes == -1).all()  # whole tile images, no further tiling
    df.loc[1, "TARGET"] = "2"
    df.to_csv(csv, index=False)
    frame, _ = read_annotations(csv, 3, bag_column="bag")
    with pytest.raises(UserError, match="bag 'A'"):
        build_tileset(frame, "train", tmp_path / "img", 3, 448, bag_column="bag")


@pytest.mark.parametrize("target, message", [("", "empty"), ("1 x", "not a list of integers"),
                                             ("-1", "negative"), ("7", "outside 0..2")])
def test_bad_targets_name_file_and_row(tmp_path, target, message):
    csv = tmp_path / "a.csv"
    pd.DataFrame({"path": ["a.png", "b.png"], "TARGET": ["0", target], "Split": ["train", "val"]}).to_csv(csv, index=False)
    with pytest.raises(UserError, match=message) as err:
        read_annotations(csv, 3)
    assert f"{csv}:3" in str(err.value)


def test_bad_split_value(tmp_path):
    csv = tmp_path / "a.csv"
    pd.DataFrame({"path": ["a.png"], "TARGET": ["0"], "Split": ["training"]}).to_csv(csv, index=False)
    with pytest.raises(UserError, match="'training' is not one of train, val, test"):
        read_annotations(csv, 3)


def test_bag_max_pooling():
    probs = torch.tensor([[0.1, 0.9], [0.7, 0.2], [0.3, 0.4], [0.05, 0.01]])
    bags = torch.tensor([0, 0, 1, 2])
    assert torch.equal(bag_max(probs, bags, 3), torch.tensor([[0.7, 0.9], [0.3, 0.4], [0.05, 0.01]]))


def test_results_file_valid_after_every_write(tmp_path):
    path = tmp_path / "results.json"
    results = ResultsFile(path)
    for epoch in range(1, 4):
        results.append({"epoch": epoch, "val_results": {"mAP": float("nan"), "f1": np.float32(0.5)},
                        "test_results": {"per_class": torch.tensor([0.25, 1.0])}})
        data = json.loads(path.read_text())  # strict parse after each write
        assert [r["epoch"] for r in data] == list(range(1, epoch + 1))
    assert data[0]["val_results"]["mAP"] is None and data[0]["test_results"]["per_class"] == [0.25, 1.0]
    assert "NaN" not in path.read_text()
    again = ResultsFile(path)
    again.truncate_after(1)
    assert [r["epoch"] for r in json.loads(path.read_text())] == [1]
    path.write_text("[{]")
    with pytest.raises(UserError, match="not valid JSON"):
        ResultsFile(path)


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(patience=4)
    assert [stopper.step(x) for x in (True, False, False, True, False, False, False, False)] == \
        [False, False, False, False, False, False, False, True]
    assert not any(EarlyStopping(0).step(False) for _ in range(10))  # 0 = never stop


def test_cache_dir_that_is_a_file_and_csv_that_is_a_directory(tmp_path):
    csv = _write_images(tmp_path, [(64, 64)])
    df, c = read_annotations(csv, 3)
    tiles = build_tileset(df, "train", tmp_path / "img", c, tile_size=32)
    with pytest.raises(UserError, match=f"tile cache directory {csv} cannot be created"):
        build_tile_cache(tiles, 16, csv)
    with pytest.raises(UserError, match="is a directory, expected a CSV file"):
        read_annotations(tmp_path / "img", 3)


@pytest.mark.parametrize("mode, array, words", [
    ("I;16", np.full((8, 8), 1000, np.uint16), "16-bit integer"),
    ("F", np.full((8, 8), 0.5, np.float32), "32-bit float"),
    ("I", np.full((8, 8), 70000, np.int32), "32-bit integer"),
])
def test_images_wider_than_8_bits_are_refused(tmp_path, mode, array, words):
    Image.fromarray(array).save(tmp_path / "wide.tif")
    with Image.open(tmp_path / "wide.tif") as im:
        assert im.mode == mode
    with pytest.raises(UserError, match=rf"wide.tif is a {words} image \(Pillow mode {mode}\); expected 8-bit grey "
                                        rf"or RGB"):
        ana._image_size(tmp_path / "wide.tif")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "LA"])
def test_8_bit_images_of_any_mode_are_accepted(tmp_path, mode):
    Image.new(mode, (12, 8)).save(tmp_path / "ok.png")
    assert ana._image_size(tmp_path / "ok.png") == (12, 8)


def test_split_overlap_is_found_by_resolved_path(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    (tmp_path / "link.png").symlink_to(tmp_path / "img" / "a.png")
    train = pd.DataFrame({"path": ["a.png", "b.png", "b.png", "./b.png"]})
    test = pd.DataFrame({"path": ["link.png", "c.png"]})
    splits = [("train", train, tmp_path / "img", "ann.csv"), ("val", pd.DataFrame({"path": []}), tmp_path, "ann.csv"),
              ("test", test, tmp_path, "test.csv")]
    with pytest.raises(UserError, match=r"test.csv: 1 image\(s\) are in both train and test \(a.png\); .*"
                                        r"--allowSplitOverlap"):
        ana.check_split_overlap(splits)
    notes = ana.check_split_overlap(splits, allow_overlap=True)
    assert notes == ["warning: ann.csv train: 1 image(s) listed more than once (2 extra rows; b.png); "
                     "each row counts as a separate image",
                     "warning: test.csv: 1 image(s) are in both train and test (a.png); allowed by --allowSplitOverlap"]
