"""preprocess_cryoem.py: frames under downsampling, patches, prior, labelled subset, val/test, errors."""
import json

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

import preprocess_cryoem
from datasets.cryoem_dataset_pu import load_pu_data
from datasets.cryoem_preprocess import (PreprocessOptions, crops_at, prepare_micrograph, to_downsampled, to_original,
                                        window_centres)
from datasets.micrographs import write_csv
from preprocess_cryoem import run_preprocess
from utils.errors import UserError


def _write_mrc(path, array):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(array, dtype=np.float32))


def _coords(rows):
    return pd.DataFrame(rows, columns=["micrograph", "x", "y"]).assign(score=np.nan)


# ----------------------------------------------------------------------------- frames
@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_block_centre_maps_to_the_downsampled_pixel(factor):
    # a bright f x f block whose top-left is at original (x0, y0) = (8f, 5f) is centred on
    # downsampled pixel (u, v) = (8, 5): the maximum, with equal neighbours on either side;
    # the block's centre (x0 + (f-1)/2) maps onto it
    f = int(factor)
    a = np.zeros((24 * f, 20 * f), dtype=np.float32)
    a[5 * f:6 * f, 8 * f:9 * f] = 1.0
    img, scale = prepare_micrograph(a, factor, "none")
    assert img.shape == (24, 20) and scale == (factor, factor)
    assert torch.nonzero(img == img.max()).tolist() == [[5, 8]]
    assert img[5, 7] == pytest.approx(float(img[5, 9])) and img[4, 8] == pytest.approx(float(img[6, 8]))
    assert float(img.sum()) == pytest.approx(1.0, rel=1e-4)  # the filter keeps the mass: f*f / (f*f)
    centre = np.array([[8 * f + (f - 1) / 2, 5 * f + (f - 1) / 2]])
    np.testing.assert_allclose(to_downsampled(centre, scale), [[8, 5]])
    np.testing.assert_allclose(to_original([[8, 5]], scale), centre)


def test_non_integer_downsampling_keeps_the_pixel_centre_frame():
    # a ramp a[y, x] = x: each downsampled pixel holds the original x of its own centre,
    # which is what to_original says (away from the border, where the filter is cut)
    a = np.tile(np.arange(90, dtype=np.float32), (60, 1))
    img, (sx, sy) = prepare_micrograph(a, 1.5, "none")
    assert img.shape == (40, 60) and (sx, sy) == (1.5, 1.5)
    u = np.arange(2, 58)
    expect = to_original(np.stack([u, np.zeros_like(u)], 1), (sx, sy))[:, 0]
    # the sampled triangle filter is centred to within 1/36 px at factor 1.5, and on average exactly
    np.testing.assert_allclose(img[10, 2:58].numpy(), expect, atol=0.03)
    assert float(np.mean(img[10, 2:58].numpy() - expect)) == pytest.approx(0, abs=1e-4)
    xy = np.array([[0.0, 0.0], [59.0, 89.0], [12.3, 45.6]])
    np.testing.assert_allclose(to_original(to_downsampled(xy, (sx, sy)), (sx, sy)), xy)
    # the first downsampled pixel covers original [0, 1.5): its centre is at 0.25
    np.testing.assert_allclose(to_original([[0, 0]], (sx, sy)), [[0.25, 0.25]])


def test_zscore_is_per_micrograph():
    a = np.arange(100, dtype=np.float32).reshape(10, 10) * 3 + 7
    img, _ = prepare_micrograph(a, 1, "zscore")
    assert float(img.mean()) == pytest.approx(0, abs=1e-5)
    assert float(img.std()) == pytest.approx(1, abs=1e-5)


def test_crops_are_centred_and_zero_padded():
    img = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    c = crops_at(img, [[4, 6], [0, 0]], 4)
    # centred on (4, 6): rows 2..5, cols 4..7
    assert torch.equal(c[0], img[2:6, 4:8])
    # centred on the corner: the top-left 2 x 2 lies outside and reads 0
    assert torch.equal(c[1][:2], torch.zeros(2, 4)) and torch.equal(c[1][:, :2], torch.zeros(4, 2))
    assert torch.equal(c[1][2:, 2:], img[:2, :2])


def test_windows_are_fully_inside():
    centres = window_centres(10, 13, 4, 3)
    # tops 0, 3, 6 (6 + 4 <= 10), lefts 0, 3, 6, 9 (9 + 4 <= 13); centre = top-left + 2
    assert sorted({int(r) for r in centres[:, 0]}) == [2, 5, 8]
    assert sorted({int(c) for c in centres[:, 1]}) == [2, 5, 8, 11]
    assert len(centres) == 12


# ----------------------------------------------------------------------------- a full run
@pytest.fixture
def tiny_micrographs(tmp_path):
    """3 micrographs 96 x 128 with particle coordinates (CSV); mic_c is for test."""
    rng = np.random.default_rng(0)
    mics = tmp_path / "mics"
    mics.mkdir()
    rows = []
    for name, n in (("mic_a", 6), ("mic_b", 5), ("mic_c", 4)):
        _write_mrc(mics / f"{name}.mrc", rng.normal(size=(96, 128)))
        for i in range(n):
            rows.append((f"{name}.mrc", 10.0 + 20 * i, 20.0 + 10 * (i % 3)))
    write_csv(tmp_path / "coords.csv", _coords(rows))
    return mics, tmp_path / "coords.csv"


def _opts(**kw):
    base = dict(particle_radius=8, patch_size=16, context=0, stride=8, downsample=1, labelled_fraction=0.4, seed=3,
                test_micrographs=("mic_c",))
    base.update(kw)
    return PreprocessOptions(**base)


def test_run_writes_the_seed_layout_and_loads(tiny_micrographs, tmp_path):
    mics, coords = tiny_micrographs
    out = tmp_path / "data"
    summary = run_preprocess([mics], coords, out, _opts())
    obj = torch.load(out / "preprocessed_data.pt", weights_only=True)
    # labelled: round(0.4 * 6) = 2 on mic_a, round(0.4 * 5) = 2 on mic_b
    assert obj["patches"]["positive"].shape == (4, 16, 16)
    assert obj["patches"]["positive"].dtype == torch.float16
    # windows: tops 0..80 step 8 (11) x lefts 0..112 step 8 (15) = 165 per training micrograph
    assert obj["patches"]["unlabeled"].shape == (330, 16, 16)
    meta = obj["metadata"]
    assert meta["source_micrographs"] == ["mic_a.mrc", "mic_b.mrc"] and meta["test_micrographs"] == ["mic_c.mrc"]
    assert meta["patch_size"] == 16 and meta["downsample"] == 1.0 and meta["particle_radius"] == 8.0
    labelled = pd.read_csv(out / "labelled_positives.csv")
    assert len(labelled) == 4 and set(labelled["micrograph"]) == {"mic_a.mrc", "mic_b.mrc"}
    # the positive patches are the crops at the labelled particles of the normalised micrograph
    img, _ = prepare_micrograph(mrcfile.read(mics / "mic_a.mrc"), 1, "zscore")
    first = labelled.iloc[0]
    expect = crops_at(img, [[int(first.y), int(first.x)]], 16)[0].half()
    assert torch.equal(obj["patches"]["positive"][0], expect)
    # test.pt: the 4 particles of mic_c (label 1) + the windows farther than 8 px from all of them
    test = torch.load(out / "test.pt", weights_only=True)
    assert int(test["labels"].sum()) == 4
    c = np.array([(10.0 + 20 * i, 20.0 + 10 * (i % 3)) for i in range(4)])
    win = window_centres(96, 128, 16, 8)[:, ::-1]
    far = int((np.min(np.hypot(*(win[:, None, :] - c[None]).transpose(2, 0, 1)), axis=1) > 8).sum())
    assert len(test["labels"]) == 4 + far
    # the prior: fraction of training windows within 4 px (half the radius) of an annotated particle
    n_close = 0
    for name, n in (("mic_a", 6), ("mic_b", 5)):
        p = np.array([(10.0 + 20 * i, 20.0 + 10 * (i % 3)) for i in range(n)])
        d = np.min(np.hypot(*(win[:, None, :] - p[None]).transpose(2, 0, 1)), axis=1)
        n_close += int((d <= 4).sum())
    assert meta["prior"] == pytest.approx(n_close / 330)
    assert json.loads((out / "preprocess.json").read_text())["metadata"]["prior"] == pytest.approx(meta["prior"])
    assert summary["n_positive"] == 4
    data = load_pu_data(out, seed=0)
    assert data.test is not None and not data.test.heldout and data.metadata["prior"] == meta["prior"]


def test_context_is_stored_around_the_same_centres(tiny_micrographs, tmp_path):
    mics, coords = tiny_micrographs
    run_preprocess([mics], coords, tmp_path / "bare", _opts())
    run_preprocess([mics], coords, tmp_path / "ctx", _opts(context=32))
    bare = torch.load(tmp_path / "bare" / "preprocessed_data.pt", weights_only=True)
    ctx = torch.load(tmp_path / "ctx" / "preprocessed_data.pt", weights_only=True)
    meta = ctx["metadata"]
    assert (meta["patch_size"], meta["window_size"], meta["context"]) == (80, 16, 32)
    for kind in ("positive", "unlabeled"):
        a, b = bare["patches"][kind], ctx["patches"][kind]
        assert b.shape[1:] == (80, 80) and len(a) == len(b)
        assert torch.equal(b[:, 32:48, 32:48], a)  # the window is the centre of the stored patch
    assert meta["prior"] == bare["metadata"]["prior"]


def test_labelled_count_chunks_and_expected_particles(tiny_micrographs, tmp_path):
    mics, coords = tiny_micrographs
    out = tmp_path / "data"
    run_preprocess([mics], coords, out, _opts(labelled_count=3, chunk_size=100, expected_particles=10,
                                              dtype="float32", test_micrographs=()))
    chunks = sorted(out.glob("chunk_*.pt"))
    assert len(chunks) >= 4 and not (out / "preprocessed_data.pt").exists()
    pos = sum(torch.load(c, weights_only=True)["patches"]["positive"].shape[0] for c in chunks)
    assert pos == 9  # 3 per micrograph, 3 training micrographs
    meta = torch.load(chunks[-1], weights_only=True)["metadata"]
    assert meta["prior"] == pytest.approx(10 * np.pi * 4 ** 2 / (96 * 128))
    assert meta["prior_method"] == "expected_particles"


def test_the_labelled_subset_depends_on_the_seed_only(tiny_micrographs, tmp_path):
    mics, coords = tiny_micrographs
    run_preprocess([mics], coords, tmp_path / "a", _opts(seed=1))
    run_preprocess([mics], coords, tmp_path / "b", _opts(seed=1))
    run_preprocess([mics], coords, tmp_path / "c", _opts(seed=2))
    read = lambda d: pd.read_csv(tmp_path / d / "labelled_positives.csv")  # noqa: E731
    assert read("a").equals(read("b"))
    assert not read("a").equals(read("c"))


def test_cli_refuses_to_overwrite_and_keeps_the_old_data(tiny_micrographs, tmp_path, capsys):
    mics, coords = tiny_micrographs
    out = tmp_path / "data"
    argv = ["--micrographs", str(mics), "--coordinates", str(coords), "--output-dir", str(out),
            "--particle-radius", "8", "--patch-size", "16", "--context", "0", "--stride", "8"]
    preprocess_cryoem.main(argv)
    before = (out / "preprocessed_data.pt").read_bytes()
    with pytest.raises(SystemExit) as exc:
        preprocess_cryoem.main(argv)
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    # a failing overwrite (bad test micrograph name) leaves the earlier files untouched
    with pytest.raises(SystemExit):
        preprocess_cryoem.main(argv + ["--overwrite", "--test-micrographs", "nope"])
    assert (out / "preprocessed_data.pt").read_bytes() == before
    assert not list(out.glob(".preprocess-*"))
    preprocess_cryoem.main(argv + ["--overwrite", "--labelled-fraction", "0.5"])
    assert torch.load(out / "preprocessed_data.pt", weights_only=True)["metadata"]["labelled_fraction"] == 0.5


@pytest.mark.parametrize("extra, message", [
    (["--test-micrographs", "mic_x"], "--test-micrographs: no micrograph named 'mic_x'"),
    (["--test-micrographs", "mic_a", "mic_b", "mic_c"], "leave at least one for training"),
    (["--patch-size", "15"], "--patch-size is 15, expected an even number"),
    (["--labelled-fraction", "0"], "argument --labelled-fraction: expected a finite number in (0, 1], got '0'"),
    (["--downsample", "0.5"], "argument --downsample: expected a finite number >= 1, got '0.5'"),
    (["--patch-size", "256"], "is smaller than --patch-size 256"),
    (["--context", "16"], "--context is 16, expected a non-negative multiple of 32"),
    (["--stride", "16", "--positive-radius", "2"], "no unlabelled window is centred within 2 px"),
])
def test_bad_options_are_one_line_errors(tiny_micrographs, tmp_path, capsys, extra, message):
    mics, coords = tiny_micrographs
    with pytest.raises(SystemExit) as exc:
        preprocess_cryoem.main(["--micrographs", str(mics), "--coordinates", str(coords), "--output-dir",
                                str(tmp_path / "out"), "--particle-radius", "8", "--patch-size", "16", "--context", "0",
                                *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "preprocessed_data.pt").exists()


def test_unreadable_micrograph_and_unmatched_names(tiny_micrographs, tmp_path, capsys):
    mics, coords = tiny_micrographs
    (mics / "broken.mrc").write_bytes(b"not an mrc file")
    with pytest.raises(SystemExit):
        preprocess_cryoem.main(["--micrographs", str(mics), "--coordinates", str(coords), "--output-dir",
                                str(tmp_path / "out"), "--particle-radius", "8", "--patch-size", "16"])
    assert "broken.mrc" in capsys.readouterr().err
    (mics / "broken.mrc").unlink()
    other = tmp_path / "other.csv"
    write_csv(other, _coords([("elsewhere.mrc", 5.0, 5.0)]))
    with pytest.raises(UserError, match="other.csv"):
        run_preprocess([mics], other, tmp_path / "out", _opts())


def test_coordinates_outside_are_dropped_with_a_warning(tiny_micrographs, tmp_path, caplog):
    mics, coords = tiny_micrographs
    df = pd.read_csv(coords)
    df.loc[len(df)] = ["mic_a.mrc", 500.0, 20.0, np.nan]
    write_csv(tmp_path / "c2.csv", df)
    with caplog.at_level("WARNING"):
        run_preprocess([mics], tmp_path / "c2.csv", tmp_path / "out", _opts())
    assert any("outside" in r.getMessage() and "c2.csv" in r.getMessage() for r in caplog.records)
