"""pick_particles.py's files for RELION / cryoSPARC, --invert-y, rethreshold_picks.py, and a picking
folder that survives a failed run; evaluate_picks.py's use of picking.json.

The model is a ResNet-18 with random weights saved as a best_model.pt (what these tests check
does not depend on training): generated 256 px micrographs in a two-folder tree, downsampling 2,
a 32 px window with 32 px of context, map stride 16.
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

import evaluate_picks
import pick_particles
import rethreshold_picks
from datasets.micrographs import micrograph_shape, read_coordinates, write_star
from datasets.synthetic_micrographs import generate_micrograph_demo
from models.fixmatch_pu import FixMatchPUModel

RADIUS = 12


def _checkpoint(path, threshold=None, particles_per_px=None):
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=32)
    ckpt = {"model": model.state_dict(), "backbone": "resnet18", "patch_size": 96, "context": 32,
            "data_metadata": {"downsample": 2.0, "normalization": "zscore", "particle_radius": float(RADIUS),
                              "window_size": 32}}
    if threshold is not None:
        ckpt["picking_threshold"] = {"value": threshold, "rule": "val_best_f1", "why": "stored by the test"}
    if particles_per_px is not None:
        ckpt["picking_threshold"] = {"rule": "prior", "particles_per_px": particles_per_px, "why": "stored by the test"}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three micrographs in mics/a/ and mics/b/, their reference STAR, and two checkpoints."""
    root = tmp_path_factory.mktemp("pick_outputs")
    raw = generate_micrograph_demo(root / "raw", n_micrographs=3, size=256, particle_radius=RADIUS, n_particles=12,
                                   n_decoys=4, noise=0.3, seed=7)
    mics = []
    for i, src in enumerate(raw["micrographs"]):
        dst = root / "mics" / ("a" if i < 2 else "b") / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        mics.append(dst)
    return {"root": root, "mics": mics, "star": raw["star"], "ckpt": _checkpoint(root / "best.pt", threshold=0.3),
            "old_ckpt": _checkpoint(root / "old.pt"),
            # 7 particles per 256 x 256 micrograph: 21 on the three
            "prior_ckpt": _checkpoint(root / "prior.pt", particles_per_px=7 / 256 ** 2)}


def _pick(setup, out, *extra, mics=None):
    return pick_particles.main(["--checkpoint", str(setup["ckpt"]), "--micrographs",
                                *map(str, mics if mics is not None else setup["mics"]), "--output-dir", str(out),
                                "--stride", "16", "--device", "cpu", *extra])


def _snapshot(folder, skip=("picking.log",)):
    """{relative path: sha256} of every file under ``folder`` (the append-only log aside)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def _star_rows(path):
    """A STAR file's rows without the writer's timestamp comment (to compare two runs)."""
    return [line for line in Path(path).read_text().splitlines() if not line.startswith("#")]


def _fail(capsys, fn, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------- RELION / cryoSPARC

def test_relion_files_read_back_and_the_index_names_each(setup, tmp_path):
    out = tmp_path / "picks"
    summary = _pick(setup, out, "--threshold", "0.05")
    index = starfile.read(out / "autopick.star", always_dict=True)
    assert list(index) == ["coordinate_files"]
    index = index["coordinate_files"]
    assert list(index.columns) == ["rlnMicrographName", "rlnMicrographCoordinates"]
    assert list(index["rlnMicrographName"]) == [str(p) for p in setup["mics"]]  # the paths as given
    combined = starfile.read(out / "picks.star")
    assert combined["rlnAutopickFigureOfMerit"].min() >= 0.05 and len(combined) == summary["n_picks"] > 0
    total = 0
    for mic, star in zip(setup["mics"], index["rlnMicrographCoordinates"]):
        # named after the micrograph, in a tree that mirrors the inputs (a/ and b/ below mics/)
        assert Path(star) == out / mic.parent.name / f"{mic.stem}_autopick.star"
        per_mic = starfile.read(star, always_dict=True)[""] if Path(star).stat().st_size else None
        assert list(per_mic.columns) == ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"]
        mine = combined[combined["rlnMicrographName"] == str(mic)]
        np.testing.assert_allclose(per_mic[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(),
                                   mine[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy())
        box = np.loadtxt(out / "box" / mic.parent.name / f"{mic.stem}.box", ndmin=2).reshape(-1, 4)
        assert len(box) > 0
        np.testing.assert_allclose(box[:, :2] + RADIUS, per_mic[["rlnCoordinateX", "rlnCoordinateY"]], atol=0.01)
        total += len(per_mic)
    assert total == len(combined)
    # candidates: every pick, plus the ones below the threshold down to the score floor
    candidates = starfile.read(out / "candidates.star")
    assert len(candidates) > len(combined) and candidates["rlnAutopickFigureOfMerit"].min() >= 0.01
    saved = json.loads((out / "picking.json").read_text())
    assert saved["threshold"] == 0.05 and saved["threshold_rule"] == "given by --threshold"
    assert sorted(saved["files"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                            if p.is_file() and p.name != "picking.log")
    log = (out / "picking.log").read_text()
    assert "scores 0.00-0.10" in log and "<- threshold" in log and (out / "score_histogram.png").stat().st_size


def test_threshold_auto_uses_the_checkpoint(setup, tmp_path, capsys):
    summary = _pick(setup, tmp_path / "auto")
    assert summary["threshold"] == 0.3 and summary["threshold_rule"].startswith("auto: val_best_f1 rule")
    assert "threshold 0.3 (auto: val_best_f1 rule, stored by the test)" in (tmp_path / "auto" / "picking.log").read_text()
    # the prior rule: as many picks as particles expected on the micrographs' area (7 x 3), the
    # threshold being the score of the 21st best candidate
    summary = pick_particles.main(["--checkpoint", str(setup["prior_ckpt"]), "--micrographs",
                                   *map(str, setup["mics"]), "--output-dir", str(tmp_path / "prior"), "--stride", "16"])
    scores = np.sort(starfile.read(tmp_path / "prior" / "candidates.star")["rlnAutopickFigureOfMerit"])[::-1]
    assert len(scores) > 21 and summary["threshold"] == scores[20] and summary["n_picks"] == 21
    assert "21 particles expected on 3 micrograph(s)" in summary["threshold_rule"]
    assert summary["score_floor"] == 0.01  # the candidates stop at the floor whatever the threshold
    line = _fail(capsys, pick_particles.main, ["--checkpoint", str(setup["old_ckpt"]), "--micrographs",
                                               str(setup["mics"][0]), "--output-dir", str(tmp_path / "old")])
    assert "old.pt: holds no picking threshold" in line and "--threshold" in line
    assert not (tmp_path / "old").exists()


def test_invert_y_round_trips(setup, tmp_path):
    plain, flipped = tmp_path / "plain", tmp_path / "flipped"
    _pick(setup, plain, "--threshold", "0.05")
    _pick(setup, flipped, "--threshold", "0.05", "--invert-y")
    a, b = starfile.read(plain / "candidates.star"), starfile.read(flipped / "candidates.star")
    heights = {str(p): micrograph_shape(p)[0] for p in setup["mics"]}
    np.testing.assert_allclose(b["rlnCoordinateY"], a["rlnMicrographName"].map(heights) - 1 - a["rlnCoordinateY"],
                               atol=1e-6)
    np.testing.assert_array_equal(b["rlnCoordinateX"], a["rlnCoordinateX"])
    # flipped picks against the reference flipped the same way score exactly as the plain picks
    # (a radius of two particle radii, so that this random model's candidates match some)
    args = ["--reference", str(setup["star"]), "--radius", str(2 * RADIUS), "--threshold", "0"]
    want = evaluate_picks.main(["--picks", str(plain / "candidates.star"), *args])["overall"]
    got = evaluate_picks.main(["--picks", str(flipped / "candidates.star"), "--invert-y", *args])["overall"]
    mismatched = evaluate_picks.main(["--picks", str(flipped / "candidates.star"), *args])["overall"]
    assert want["tp"] > 0
    for key in ("tp", "n_picks", "average_precision", "best_f1", "distance_mean"):
        assert got[key] == pytest.approx(want[key]), key
    assert mismatched["tp"] != want["tp"]


def test_evaluate_invert_y_flips_the_reference(setup, tmp_path):
    # the reference itself, flipped upside down and given scores, is found completely only when
    # evaluate_picks.py flips the reference the same way; heights from the micrographs' headers
    reference = read_coordinates(setup["star"])[0]
    heights = {p.stem: micrograph_shape(p)[0] for p in setup["mics"]}
    flipped = reference.assign(y=reference["micrograph"].map(lambda m: heights[Path(m).stem]) - 1 - reference["y"],
                               score=np.linspace(1, 0.5, len(reference)))
    write_star(tmp_path / "flipped.star", flipped)
    folder = tmp_path / "all"
    folder.mkdir()
    for p in setup["mics"]:
        shutil.copy(p, folder / p.name)
    args = ["--picks", str(tmp_path / "flipped.star"), "--reference", str(setup["star"]), "--radius", "1"]
    result = evaluate_picks.main([*args, "--invert-y", "--micrograph-dir", str(folder)])["overall"]
    assert result["tp"] == result["n_targets"] == len(reference) and result["distance_mean"] == pytest.approx(0)
    assert evaluate_picks.main(args)["overall"]["tp"] < len(reference) / 2


# ------------------------------------------------------------------------------ re-thresholding

def test_rethreshold_gives_the_picks_of_picking_at_that_threshold(setup, tmp_path, capsys):
    first, direct, changed = tmp_path / "first", tmp_path / "direct", tmp_path / "changed"
    _pick(setup, first, "--threshold", "0.3", "--overlay")
    candidates = starfile.read(first / "candidates.star")["rlnAutopickFigureOfMerit"]
    # a candidate's own score (>= keeps it), below 0.3: more picks than the first run
    t = float(np.sort(candidates)[int(0.8 * len(candidates))])
    assert t < 0.3 and (candidates == t).any()
    _pick(setup, direct, "--threshold", str(t), "--overlay")
    result = rethreshold_picks.main(["--picks", str(first), "--threshold", str(t), "--output-dir", str(changed)])
    assert result["threshold"] == t and result["n_picks"] > json.loads((first / "picking.json").read_text())["n_picks"]
    assert result["n_picks"] == int((candidates >= t).sum()) == len(starfile.read(changed / "picks.star"))
    names = ["autopick.star", "picks.star", "candidates.star"] + [
        str(p.relative_to(direct)) for p in direct.rglob("*_autopick.star")]
    for name in names:  # (the index names the files of its own folder)
        assert [r.replace(str(changed), str(direct)) for r in _star_rows(changed / name)] == \
            _star_rows(direct / name), name
    for box in direct.rglob("*.box"):
        assert (changed / box.relative_to(direct)).read_bytes() == box.read_bytes()
    assert (changed / "picks.csv").read_bytes() == (direct / "picks.csv").read_bytes()
    assert sorted(p.name for p in (changed / "overlays").rglob("*.png")) == [p.stem + ".png" for p in setup["mics"]]
    # in place (the default), back up to 0.3: the first run's picks again
    rethreshold_picks.main(["--picks", str(changed), "--threshold", "0.3"])
    assert _star_rows(changed / "picks.star") == _star_rows(first / "picks.star")
    # below the run's score floor the candidates are incomplete: refused, nothing written
    before = _snapshot(changed)
    line = _fail(capsys, rethreshold_picks.main, ["--picks", str(changed), "--threshold", "0.001"])
    assert "--threshold is 0.001" in line and "score floor 0.01" in line
    assert _snapshot(changed) == before
    line = _fail(capsys, rethreshold_picks.main, ["--picks", str(tmp_path), "--threshold", "0.5"])
    assert "picking.json: not found" in line
    (tmp_path / "a_file").write_text("x")
    line = _fail(capsys, rethreshold_picks.main, ["--picks", str(changed), "--threshold", "0.3",
                                                  "--output-dir", str(tmp_path / "a_file")])
    assert "--output-dir" in line and "a_file is a file" in line
    line = _fail(capsys, rethreshold_picks.main, ["--picks", str(changed), "--threshold", "nan"])
    assert "argument --threshold: expected a finite number in [0, 1], got 'nan'" in line
    assert _snapshot(changed) == before


# ----------------------------------------------------------- a folder that already holds picks

def test_a_failed_run_leaves_the_folder_as_it_was(setup, tmp_path, capsys):
    out = tmp_path / "picks"
    _pick(setup, out, "--threshold", "0.2", "--overlay")
    before, log_before = _snapshot(out), (out / "picking.log").read_text()
    # a PNG whose header reads but whose pixels do not (the old code had rewritten
    # box/<first>.box before reaching it): refused before anything is written
    broken = tmp_path / "broken" / "zz_broken.png"
    broken.parent.mkdir()
    data = Path(setup["mics"][1]).read_bytes()
    broken.write_bytes(data[:len(data) // 3])
    line = _fail(capsys, lambda argv: _pick(setup, out, *argv, mics=setup["mics"] + [broken]),
                 ["--threshold", "0.5", "--overlay"])  # overlays are written while picking
    assert "zz_broken.png" in line
    assert _snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".pick-")]  # no staging left behind
    assert (out / "picking.log").read_text() == log_before  # refused before the log was opened
    log_lines = len((out / "picking.log").read_text().splitlines())
    # a header that cannot be read, or a micrograph smaller than the window: refused before
    # anything is written (the log is not even opened)
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"not an mrc file at all")
    tiny = tmp_path / "tiny" / "tiny.mrc"
    tiny.parent.mkdir()
    import mrcfile
    with mrcfile.new(tiny) as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32))  # 20 px after downsampling 2 < the 32 px window
    for bad, message in ((junk, "junk.mrc: cannot be read"), (tiny, "tiny.mrc: 40x40 px, 20x20 after downsampling by 2, "
                                                                     "is smaller than the model's 32 px window")):
        line = _fail(capsys, lambda argv: _pick(setup, out, *argv, mics=setup["mics"] + [bad]), [])
        assert message in line
    assert _snapshot(out) == before
    assert len((out / "picking.log").read_text().splitlines()) == log_lines


def test_a_new_run_replaces_the_previous_runs_files(setup, tmp_path):
    out = tmp_path / "picks"
    _pick(setup, out, "--threshold", "0.2", "--overlay")
    _pick(setup, out, "--threshold", "0.2", mics=setup["mics"][:1])
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert not [name for name in left if "overlays/" in name or setup["mics"][2].stem in name]
    index = starfile.read(out / "autopick.star")
    assert list(index["rlnMicrographName"]) == [str(setup["mics"][0])]


def test_a_killed_runs_staging_folder_is_removed_and_logged(setup, tmp_path):
    """pick_particles.py and rethreshold_picks.py both delete a staging folder a kill left behind."""
    out = tmp_path / "picks"
    for run in (lambda: _pick(setup, out, "--threshold", "0.2"),
                lambda: rethreshold_picks.main(["--picks", str(out), "--threshold", "0.3"])):
        killed = out / ".pick-killed"
        (killed / "box").mkdir(parents=True)
        (killed / "box" / "half.box").write_text("1 2 3 4\n")
        run()
        assert not killed.exists()
        assert not [p for p in out.iterdir() if p.name.startswith(".pick-")]
        last_lines = (out / "picking.log").read_text().splitlines()[-20:]
        assert any("removed the temporary folder(s) of an interrupted run: .pick-killed" in line
                   for line in last_lines)


def test_bad_flags(setup, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for extra, message in ((["--tile-size", "-1"], "argument --tile-size: expected an integer >= 0, got '-1'"),
                           (["--tile-size", "64"], "--tile-size is 64"),
                           (["--score-floor", "2"], "argument --score-floor: expected a finite number in [0, 1], got '2'"),
                           (["--box-size", "0"], "argument --box-size: expected an integer >= 1, got '0'"),
                           (["--output-dir", str(tmp_path / "file")], "is a file")):
        assert message in _fail(capsys, lambda argv: _pick(setup, tmp_path / "p", *argv), extra)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _pick(setup, tmp_path / "p", "--threshold", "high")
    assert exc.value.code == 2 and "expected a probability in [0, 1] or auto" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------- evaluation with picking.json

def test_evaluation_counts_picked_micrographs_without_picks(setup, tmp_path):
    out = tmp_path / "picks"
    _pick(setup, out, "--threshold", "0.999")  # nothing reaches it: no pick on any micrograph
    # the candidates file: the default threshold is the picking threshold, every picked
    # micrograph counts, and its particles are missed when it has no pick at that threshold
    result = evaluate_picks.main(["--picks", str(out / "candidates.star"), "--reference", str(setup["star"]),
                                  "--radius", str(RADIUS)])
    assert evaluate_picks.main(["--picks", str(out), "--reference", str(setup["star"]), "--radius",
                                str(RADIUS)])["overall"] == result["overall"]  # the folder means its candidates
    reference = read_coordinates(setup["star"])[0]
    assert result["threshold"] == 0.999
    assert set(result["per_micrograph"]) == {p.stem for p in setup["mics"]}
    assert result["overall"]["n_targets"] == len(reference) and result["overall"]["recall"] == 0.0
    pd.testing.assert_series_equal(pd.Series([m["n_picks"] for m in result["per_micrograph"].values()]),
                                   pd.Series([0, 0, 0]))
