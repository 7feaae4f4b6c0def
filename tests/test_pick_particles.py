"""End to end on generated micrographs: preprocess -> train 1 epoch -> pick -> evaluate; pick_particles errors."""
import json

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
import yaml
from PIL import Image

import evaluate_picks
import pick_particles
import rethreshold_picks
import preprocess_cryoem
import train_pu_selective_fixmatch
from datasets.cryoem_preprocess import prepare_micrograph
from datasets.micrographs import read_coordinates, read_micrograph
from models.dense import probability_map
from utils.picking.picker import load_picker
from datasets.synthetic_micrographs import generate_micrograph_demo
from utils.cryoem.config import default_config
from utils.picking.matching import evaluate_picks as evaluate_picks_fn

SIZE, RADIUS = 320, 16


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Generated micrographs (3 train, 1 test), preprocessed at downsampling 2, trained 1 epoch."""
    root = tmp_path_factory.mktemp("pipeline")
    raw = generate_micrograph_demo(root / "raw", n_micrographs=4, size=SIZE, particle_radius=RADIUS,
                                   n_particles=25, n_decoys=8, noise=0.3, seed=3)
    preprocess_cryoem.main(["--micrographs", str(root / "raw" / "micrographs"), "--coordinates", str(raw["star"]),
                            "--output-dir", str(root / "data"), "--particle-radius", str(RADIUS),
                            "--downsample", "2", "--patch-size", "32", "--context", "32", "--stride", "8",
                            "--labelled-fraction", "0.3", "--test-micrographs", "mic_03"])
    cfg = default_config()
    cfg["loss"]["prior"] = "auto"
    cfg["data"]["num_workers"] = 0
    cfg["training"].update(epochs=1, batch_size=32, device="cpu", rampup_epochs=0)
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train_pu_selective_fixmatch.main(["--config", str(root / "cfg.yaml"), "--data-dir", str(root / "data"),
                                      "--output-dir", str(root / "exp"), "--exp-name", "run"])
    return {"root": root, "raw": raw, "ckpt": root / "exp" / "run" / "best_model.pt",
            "test_mic": root / "raw" / "micrographs" / "mic_03.mrc"}


def test_checkpoint_carries_the_preprocessing(pipeline):
    ckpt = torch.load(pipeline["ckpt"], weights_only=True)
    meta = ckpt["data_metadata"]
    assert meta["downsample"] == 2.0 and meta["particle_radius"] == RADIUS
    assert (meta["patch_size"], meta["window_size"], meta["context"]) == (96, 32, 32) and ckpt["context"] == 32
    log = (pipeline["root"] / "exp" / "run" / "train.log").read_text()
    assert "context 32 px around a 32 px window: augmentation shifts up to 4 px per axis" in log
    results = json.loads((pipeline["root"] / "exp" / "run" / "results.json").read_text())
    assert results["data"]["prior"] == pytest.approx(meta["prior"])


def test_training_stores_the_threshold_auto_picks_at(pipeline, tmp_path):
    # the test micrograph is held out and val is a P-vs-U hold-out: the prior rule, as a particle
    # density (prior / positive-radius disc, original px), applied to the micrograph's area
    ckpt = torch.load(pipeline["ckpt"], weights_only=True)
    stored, meta = ckpt["picking_threshold"], ckpt["data_metadata"]
    assert stored["rule"] == "prior" and stored["prior"] == pytest.approx(meta["prior"])
    assert stored["particles_per_px"] == pytest.approx(meta["prior"] / (np.pi * meta["positive_radius"] ** 2))
    summary = pick_particles.main(["--checkpoint", str(pipeline["ckpt"]), "--micrographs", str(pipeline["test_mic"]),
                                   "--output-dir", str(tmp_path / "auto"), "--stride", "16", "--device", "cpu",
                                   "--score-floor", "0"])  # every cell is a candidate: more than expected
    expected = round(stored["particles_per_px"] * SIZE * SIZE)
    assert summary["threshold_rule"].startswith("auto: prior rule")
    assert f"{expected} particles expected on 1 micrograph(s)" in summary["threshold_rule"]
    scores = np.sort(starfile.read(tmp_path / "auto" / "candidates.star")["rlnAutopickFigureOfMerit"])[::-1]
    assert summary["threshold"] == scores[expected - 1] and summary["n_picks"] == int((scores >= scores[expected - 1]).sum())


def test_pick_then_evaluate(pipeline, tmp_path):
    out = tmp_path / "picks"
    summary = pick_particles.main(["--checkpoint", str(pipeline["ckpt"]), "--micrographs", str(pipeline["test_mic"]),
                                   "--output-dir", str(out), "--threshold", "0", "--stride", "8", "--overlay",
                                   "--device", "cpu"])
    # STAR read back by starfile: the RELION columns, coordinates inside the original micrograph
    star = starfile.read(out / "picks.star")
    assert list(star.columns) == ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
                                  "rlnAutopickFigureOfMerit"]
    assert len(star) == summary["n_picks"] > 0 and set(star["rlnMicrographName"]) == {str(pipeline["test_mic"])}
    assert star["rlnCoordinateX"].between(0, SIZE).all() and star["rlnCoordinateY"].between(0, SIZE).all()
    assert star["rlnAutopickFigureOfMerit"].is_monotonic_decreasing
    # picks are at least --min-distance (the particle radius) apart
    xy = star[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1)) + np.eye(len(xy)) * 1e9
    assert d.min() >= RADIUS
    # CSV and BOX hold the same picks (BOX: lower-left corner = centre - box/2, box = diameter)
    csv = pd.read_csv(out / "picks.csv")
    np.testing.assert_allclose(csv[["x", "y"]].to_numpy(), xy, atol=1e-4)
    box = np.loadtxt(out / "box" / "mic_03.box", ndmin=2)
    np.testing.assert_allclose(box[:, :2] + RADIUS, xy, atol=0.01)
    assert (box[:, 2:] == 2 * RADIUS).all()
    with Image.open(out / "overlays" / "mic_03.png") as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert json.loads((out / "picking.json").read_text())["settings"]["downsample"] == 2.0
    # a model with less than 64 px of context picked densely: the log says to use crops or retrain
    warning = [line for line in (out / "picking.log").read_text().splitlines() if "32 px of context" in line]
    assert len(warning) == 1 and "--mode crops" in warning[0] and "--context 64" in warning[0]
    pick_particles.main(["--checkpoint", str(pipeline["ckpt"]), "--micrographs", str(pipeline["test_mic"]),
                         "--output-dir", str(tmp_path / "crops"), "--threshold", "0.5", "--stride", "16",
                         "--mode", "crops", "--device", "cpu"])
    assert "px of context" not in (tmp_path / "crops" / "picking.log").read_text()  # crops are exact

    reference, _ = read_coordinates(pipeline["raw"]["star"])
    result = evaluate_picks.main(["--picks", str(out / "picks.star"), "--reference", str(pipeline["raw"]["star"]),
                                  "--radius", str(RADIUS), "--threshold", "0.5"])
    overall = result["overall"]
    assert overall["n_targets"] == 25 and overall["n_picks_total"] == len(star)
    # the CLI's numbers are those of utils.picking.matching on the files it read
    again = evaluate_picks_fn(read_coordinates(out / "picks.star")[0], reference, RADIUS, 0.5)["overall"]
    for key in ("tp", "n_picks", "precision", "recall", "average_precision", "best_f1"):
        assert overall[key] == pytest.approx(again[key])
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["overall"]["average_precision"] == pytest.approx(overall["average_precision"])
    assert (out / "evaluation.json").exists() and (out / "pr_curve.png").exists()


def test_dense_and_crop_maps_agree(pipeline):
    # the trained model (context 32 around a 32 px window) on a whole test micrograph: the dense
    # map and the crop-by-crop map rank the same places high (measured logit correlation ~0.9
    # after one epoch; 0.1-0.2 for a model trained on bare patches, see models/dense.py)
    model, ckpt = load_picker(pipeline["ckpt"], torch.device("cpu"))
    image, _ = prepare_micrograph(read_micrograph(pipeline["test_mic"]), 2, "zscore")
    dense = probability_map(model, image, ckpt["patch_size"], 8, "dense")
    crops = probability_map(model, image, ckpt["patch_size"], 8, "crops")
    assert dense.shape == crops.shape == (20, 20)
    la, lb = torch.logit(dense.double()), torch.logit(crops.double())
    assert np.corrcoef(la.flatten(), lb.flatten())[0, 1] > 0.8


@pytest.mark.parametrize("extra, message", [
    (["--stride", "12"], "--stride 12 with patch size 96"),
    (["--threshold", "1.5"], "argument --threshold: expected a probability in [0, 1] or auto, got '1.5'"),
    (["--min-distance", "0"], "argument --min-distance: expected a finite number > 0, got '0'"),
])
def test_bad_flags(pipeline, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        pick_particles.main(["--checkpoint", str(pipeline["ckpt"]), "--micrographs", str(pipeline["test_mic"]),
                             "--output-dir", str(tmp_path / "p"), *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_bad_checkpoint_and_micrograph(pipeline, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"no checkpoint here")
    for ckpt, message in ((tmp_path / "missing.pt", "does not exist"), (junk, "cannot be read")):
        with pytest.raises(SystemExit):
            pick_particles.main(["--checkpoint", str(ckpt), "--micrographs", str(pipeline["test_mic"]),
                                 "--output-dir", str(tmp_path / "p")])
        err = capsys.readouterr().err
        assert message in err and str(ckpt.name) in err
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        pick_particles.main(["--checkpoint", str(tmp_path / "other.pt"), "--micrographs", str(pipeline["test_mic"]),
                             "--output-dir", str(tmp_path / "p")])
    assert "other.pt is a checkpoint of unknown kind (keys: model); expected a CryoEM best model" in \
        capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit):
        pick_particles.main(["--checkpoint", str(pipeline["ckpt"]), "--micrographs", str(bad),
                             "--output-dir", str(tmp_path / "p")])
    assert "bad.png" in capsys.readouterr().err


def test_reference_coordinates_read_back(pipeline):
    # the generator's STAR and CSV hold the same particles (what the evaluation compares to)
    a, _ = read_coordinates(pipeline["raw"]["star"])
    b, _ = read_coordinates(pipeline["raw"]["csv"])
    np.testing.assert_allclose(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())


def test_particle_diameter_in_angstrom_and_the_pixel_size_in_the_star_files(pipeline, tmp_path):
    # 80 A at 2 A/px = 40 px across: NMS distance 20 px (the radius), BOX side 40 px
    out = tmp_path / "angstrom"
    summary = pick_particles.main(["--checkpoint", str(pipeline["ckpt"]), "--micrographs", str(pipeline["test_mic"]),
                                   "--output-dir", str(out), "--threshold", "0", "--stride", "16", "--device", "cpu",
                                   "--pixel-size", "2", "--particle-diameter-A", "80"])
    assert summary["settings"]["min_distance"] == 20.0 and summary["box_size"] == 40 and summary["pixel_size"] == 2.0
    blocks = starfile.read(out / "picks.star", always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    assert float(blocks["optics"]["rlnMicrographPixelSize"].iloc[0]) == 2.0
    assert len(blocks["particles"]) == summary["n_picks"] > 0
    xy = blocks["particles"][["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1)) + np.eye(len(xy)) * 1e9
    assert d.min() >= 20.0
    index = starfile.read(out / "autopick.star")
    assert (index["rlnMicrographPixelSize"] == 2.0).all()
    box = np.loadtxt(out / "box" / "mic_03.box", ndmin=2)
    assert (box[:, 2:] == 40).all()
    assert read_coordinates(out / "picks.star")[0]["x"].tolist() == pytest.approx(xy[:, 0].tolist())
    # rethreshold_picks.py keeps the pixel size
    rethreshold_picks.main(["--picks", str(out), "--threshold", "0.5"])
    assert (starfile.read(out / "autopick.star")["rlnMicrographPixelSize"] == 2.0).all()
