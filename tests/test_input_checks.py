"""The last bad inputs a hostile but fair user found: each ends in one ``error: ...`` line (or a
warning and a clean run) and leaves what was written before as it was.

* main.py on a PNG whose header claims 20000 x 20000 pixels (a decompression bomb);
* an input path that is a named pipe (FIFO): opening it would wait for a writer forever;
* train_pu_selective_fixmatch.py with a batch larger than the data can fill;
* duplicate particle coordinates (preprocessing and evaluation) and coordinates that all lie
  outside the micrographs;
* values the user never typed (a checkpoint's metadata) are named by their source; mrcfile's
  header warnings do not precede the error line; a resume refused for a changed --arch, changed
  data or an image truncated since is decided before the run directory gets anything new.
"""
import io
import os
import shutil
import struct
import threading
import warnings
import zlib
from pathlib import Path

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
from conftest import expect_error_line, expect_exit_2
from datasets.cryoem_dataset_pu import PUBatchSampler
from datasets.micrographs import write_csv
from datasets.synthetic_cryoem import generate_cryoem_demo
from test_cryoem_preprocess import tiny_micrographs  # noqa: F401 (a fixture, used through mics)
from test_cryoem_train import _argv as cryo_argv
from test_main_cli import _link_copy
from test_robustness import (ana_done, cryo, mics, pick_argv, picker, preprocess_argv, shared,  # noqa: F401
                             tree, write_mrc)
from utils.checkpoint import save_checkpoint
from utils.errors import UserError


# ------------------------------------------------------------------ 3. a decompression bomb

def bomb_png(path, width=20000, height=20000):
    """A valid 1 x 1 PNG whose header claims ``width`` x ``height`` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR: length, "IHDR", width, height, ...
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    Path(path).write_bytes(bytes(data))
    return path


def test_main_refuses_a_decompression_bomb_png_in_one_line(ana_args, tiny_ana, tmp_path, capsys):
    bomb_png(tiny_ana / "images" / "ana_0001.png")
    line = expect_error_line(capsys, main, ana_args("--epoch", "1"))
    assert line.startswith(f"error: image {tiny_ana / 'images' / 'ana_0001.png'} cannot be read: ")
    assert "400000000 pixels" in line and f"expected an image of at most {2 * Image.MAX_IMAGE_PIXELS} pixels" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 4. a named pipe as input

class _Unblock:
    """After ``seconds``, open ``fifo`` for writing and close it: a reader blocked on it sees an
    empty file (so a hang becomes a failure instead of blocking the test run)."""

    def __init__(self, fifo, seconds=20):
        self.timer = threading.Timer(seconds, self._release, args=(fifo,))

    @staticmethod
    def _release(fifo):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


def test_main_refuses_an_image_that_is_a_named_pipe(ana_args, tiny_ana, tmp_path, capsys):
    image = tiny_ana / "images" / "ana_0002.png"
    image.unlink()
    os.mkfifo(image)
    with _Unblock(image):
        line = expect_error_line(capsys, main, ana_args("--epoch", "1"))
    assert line.startswith(f"error: image {image} is a named pipe (FIFO), not a regular file; "), line
    assert not (tmp_path / "run").exists()


def test_an_image_behind_a_symbolic_link_is_fine(ana_args, tiny_ana, tmp_path):
    image = tiny_ana / "images" / "ana_0002.png"
    shutil.move(image, tmp_path / "elsewhere.png")
    image.symlink_to(tmp_path / "elsewhere.png")
    assert main.main(ana_args("--epoch", "1"))["best"]


@pytest.mark.parametrize("given", ["file", "folder"])
def test_preprocessing_refuses_a_micrograph_that_is_a_named_pipe(mics, tmp_path, capsys, given):
    folder = tmp_path / "mics_copy"
    shutil.copytree(mics["dir"], folder)
    fifo = folder / "mic_d.mrc"
    os.mkfifo(fifo)
    argv = preprocess_argv(mics, tmp_path / "out")
    argv[argv.index("--micrographs") + 1:argv.index("--coordinates")] = \
        [str(folder)] if given == "folder" else [str(folder / "mic_a.mrc"), str(fifo), str(folder / "mic_c.mrc")]
    with _Unblock(fifo):
        line = expect_error_line(capsys, preprocess_cryoem, argv)
    assert line.startswith(f"error: {fifo}: micrograph") and "is a named pipe (FIFO), not a regular file" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 5. a batch larger than the data

def test_a_batch_larger_than_the_data_is_refused_naming_both_numbers(cryo, tmp_path, capsys):
    # the tiny data: 40 positives + 160 unlabelled, of which training holds out a part for val/test
    argv = cryo_argv(cryo["config"], cryo["data"], tmp_path / "out", exp="x", epochs=1)
    # (1000, not the 100,000 of the report: on code without the check that batch is built and trains)
    argv[argv.index("--batch-size") + 1] = "1000"
    line = expect_error_line(capsys, cryo_entry, argv)
    assert "batch_size 1000 with batch_ratio [1, 4] takes 800 unlabelled patches per batch, more than the " in line
    n_unl = int(line.split("more than the ")[1].split()[0])
    assert 0 < n_unl <= 160 and f"use batch_size <= {n_unl * 5 // 4}" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n_pos,n_unl,batch,ratio,largest", [(64, 256, 100000, [1, 4], 320),
                                                            (64, 256, 321, [1, 4], 320),
                                                            (10, 30, 41, [1, 3], 40), (10, 30, 61, [1, 1], 60)])
def test_the_sampler_refuses_a_batch_the_unlabelled_data_cannot_fill(n_pos, n_unl, batch, ratio, largest):
    # by hand: a batch of B holds B - floor(B p / (p + u)) unlabelled patches; the largest B with at most n_unl
    with pytest.raises(UserError, match=rf"batch_size {batch} with .* more than the {n_unl} unlabelled training "
                                        rf"patches hold .*use batch_size <= {largest}$"):
        PUBatchSampler(n_pos, n_unl, batch, ratio=ratio)
    sampler = PUBatchSampler(n_pos, n_unl, largest, ratio=ratio)
    assert len(sampler) == 1 and all(sum(i >= n_pos for i in b) == n_unl for b in sampler)


# ------------------------------------------------------------------ 6. duplicate coordinates

def test_preprocessing_drops_duplicate_coordinates_with_a_warning(mics, tmp_path, capsys):
    table = mics["table"]
    twice = pd.concat([table, table.assign(x=table["x"] + 0.4)]).sort_index(kind="stable")  # every row twice
    coords = tmp_path / "twice.csv"
    write_csv(coords, twice.assign(score=np.nan))
    argv = preprocess_argv(mics, tmp_path / "once")
    once = preprocess_cryoem.main(argv)
    argv = preprocess_argv(mics, tmp_path / "twice")
    argv[argv.index("--coordinates") + 1] = str(coords)
    capsys.readouterr()
    result = preprocess_cryoem.main(argv)
    warning = [line for line in capsys.readouterr().err.splitlines() if "duplicate" in line]
    assert warning == [f"{coords}: dropped {len(table)} duplicate coordinate(s): centres closer than 1 px to another "
                       f"on the same micrograph (e.g. x={table['x'][0] + 0.4:g}, y={table['y'][0]:g} on "
                       f"'{table['micrograph'][0]}'); each particle counts once"]
    assert result["n_positive"] == once["n_positive"]
    assert result["micrographs"] == once["micrographs"]  # the test set counts each particle once
    test = torch.load(tmp_path / "twice" / "test.pt", weights_only=True)
    assert torch.equal(test["labels"], torch.load(tmp_path / "once" / "test.pt", weights_only=True)["labels"])


def test_evaluation_drops_duplicate_reference_particles_and_picks(tmp_path, capsys):
    picks = tmp_path / "picks.csv"
    picks.write_text("micrograph,x,y,score\nm1,10,10,0.9\nm1,10.5,10,0.3\nm1,50,50,0.4\n")
    reference = tmp_path / "reference.csv"
    reference.write_text("micrograph,x,y\nm1,11,10\nm1,11,10.2\nm1,80,80\nm2,80,80\n")
    capsys.readouterr()
    result = evaluate_picks.main(["--picks", str(picks), "--reference", str(reference), "--radius", "5",
                                  "--threshold", "0.3", "--micrographs", "m1"])
    err = capsys.readouterr().err
    assert (f"{picks}: dropped 1 duplicate coordinate(s): centres closer than 1 px to another on the same "
            f"micrograph (e.g. x=10.5, y=10 on 'm1'); each particle counts once") in err
    assert f"{reference}: dropped 1 duplicate coordinate(s)" in err and "(e.g. x=11, y=10.2 on 'm1')" in err
    overall = result["overall"]
    # by hand: picks (10,10) 0.9 and (50,50) 0.4; particles (11,10) and (80,80): one match
    assert (overall["n_picks"], overall["n_targets"]) == (2, 2)
    assert overall["precision"] == 0.5 and overall["recall"] == 0.5


def test_points_one_pixel_apart_are_not_duplicates(tmp_path, capsys):
    picks = tmp_path / "picks.csv"
    picks.write_text("micrograph,x,y,score\nm1,10,10,0.9\nm1,11,10,0.8\n")
    reference = tmp_path / "reference.csv"
    reference.write_text("micrograph,x,y\nm1,10,10\nm1,10,11\n")
    capsys.readouterr()
    result = evaluate_picks.main(["--picks", str(picks), "--reference", str(reference), "--radius", "0.5"])
    assert "duplicate" not in capsys.readouterr().err
    assert (result["overall"]["n_picks"], result["overall"]["n_targets"]) == (2, 2)


# ------------------------------------------------------------------ 7. every coordinate outside

def test_coordinates_all_outside_the_micrographs_say_so(mics, tmp_path, capsys):
    coords = tmp_path / "negative.csv"
    table = mics["table"]
    write_csv(coords, table.assign(x=-table["x"], y=-table["y"], score=np.nan))
    argv = preprocess_argv(mics, tmp_path / "out")
    argv[argv.index("--coordinates") + 1] = str(coords)
    line = expect_error_line(capsys, preprocess_cryoem, argv)
    assert line == (f"error: {coords}: no coordinate lies inside any micrograph: the {len(table)} coordinates of "
                    f"known micrographs span x {-table['x'].max():g}..{-table['x'].min():g}, y "
                    f"{-table['y'].max():g}..{-table['y'].min():g}, and the micrographs are 128x96 px (3 micrographs) "
                    f"(width x height); expected centres in the original micrographs' pixels, x in [0, width) and y "
                    f"in [0, height)")
    assert "--stride" not in line and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 8. messages and resume order

def test_picking_names_the_checkpoint_for_a_value_from_its_metadata(picker, tmp_path, capsys):
    ckpt = torch.load(picker["ckpt"], weights_only=True)
    ckpt["data_metadata"]["normalization"] = "per_patch_standardized"
    path = tmp_path / "odd.pt"
    save_checkpoint(ckpt, path)
    line = expect_error_line(capsys, pick_particles, pick_argv({**picker, "ckpt": path}, tmp_path / "picks"))
    assert line == (f"error: {path}: its data metadata normalization (used as no --normalize was given) is "
                    f"'per_patch_standardized', expected one of zscore, none")
    assert not (tmp_path / "picks").exists()


def test_no_mrcfile_warnings_before_the_error_line(mics, tmp_path, capsys):
    """A NaN micrograph written by another program (no MRC map ID, no machine stamp): mrcfile's
    permissive read warns about the header; only the error line is printed."""
    folder = tmp_path / "mics_copy"
    shutil.copytree(mics["dir"], folder)
    image = np.random.default_rng(0).normal(size=(96, 128))
    image[3, 4] = np.nan
    data = bytearray(write_mrc(folder / "mic_a.mrc", image).read_bytes())
    data[208:216] = b"XXXX\x00\x00\x00\x00"  # the map ID "MAP " and the machine stamp
    (folder / "mic_a.mrc").write_bytes(bytes(data))
    argv = preprocess_argv(mics, tmp_path / "out")
    argv[argv.index("--micrographs") + 1] = str(folder)
    with warnings.catch_warnings(record=True) as caught:  # what Python would print on the terminal
        warnings.simplefilter("always")
        err = expect_exit_2(capsys, preprocess_cryoem, argv)
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    assert "Warning" not in err and "warnings.warn" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"error: {folder / 'mic_a.mrc'}: 1 pixel(s) are NaN or infinite")


@pytest.fixture
def ana_resumable(ana_done, tmp_path):
    """A private copy of a finished 1-epoch ANA run in tmp_path/run, and its file tree."""
    _link_copy(ana_done, tmp_path / "run")
    return tmp_path / "run", tree(tmp_path / "run")


def test_ana_resume_with_another_arch_is_refused_before_anything_is_written(ana_resumable, ana_args, capsys):
    run_dir, before = ana_resumable
    line = expect_error_line(capsys, main, ana_args("--loadModel", "--epoch", "2", "--saveModel",
                                                    "--arch", "resnet34"))
    assert line == f"error: {run_dir / 'last.pt'} holds a different model than --arch resnet34 with 4 classes"
    assert tree(run_dir) == before  # output.txt, args.json, no new events file


def test_ana_resume_on_changed_data_is_refused_before_anything_is_written(ana_resumable, ana_args, tiny_ana, capsys):
    run_dir, before = ana_resumable
    csv = tiny_ana / "annotations.csv"
    rows = csv.read_text().splitlines()
    csv.write_text("\n".join(rows[:1] + rows[2:]) + "\n")  # one training image less
    line = expect_error_line(capsys, main, ana_args("--loadModel", "--epoch", "2", "--saveModel"))
    assert line.startswith(f"error: {run_dir / 'last.pt'} was trained on 48 training tiles of 4 classes, "
                           f"the data now give 44"), line
    assert tree(run_dir) == before


def test_ana_resume_with_an_image_truncated_since_is_refused_before_anything_is_written(ana_resumable, ana_args,
                                                                                      tiny_ana, capsys):
    run_dir, before = ana_resumable
    image = tiny_ana / "images" / "ana_0003.png"
    image.write_bytes(image.read_bytes()[:2000])  # the header reads, the pixels do not
    line = expect_error_line(capsys, main, ana_args("--loadModel", "--epoch", "2", "--saveModel"))
    assert line.startswith(f"error: image {image} cannot be decoded"), line
    assert tree(run_dir) == before


def test_cryoem_resume_on_other_data_is_refused_before_anything_is_written(cryo, tmp_path, capsys):
    out = tmp_path / "out"
    _link_copy(cryo["run_dir"], out / "done")
    before = tree(out / "done")
    other = generate_cryoem_demo(tmp_path / "other", n_pos=30, n_unl=150, n_val=20, n_test=20, patch_size=32,
                                 prior=0.3, seed=9)
    line = expect_error_line(capsys, cryo_entry, cryo_argv(cryo["config"], other, out, "--resume", exp="done",
                                                           epochs=2))
    assert line == (f"error: data in {other} changed since the run started: preprocessed_data.pt held 40 positive "
                    f"patches then, 30 now"), line
    assert tree(out / "done") == before  # train.log, config.yaml, no new events file
