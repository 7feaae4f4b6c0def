"""Run Topaz (preprocess -> train -> extract) on our split and score it beside our picker.

    python benchmarks/topaz_compare.py --topaz /path/to/topaz \
        --micrographs ../shared/data/empiar10017_sample/micrographs \
        --labelled labelled.csv --reference ../shared/data/empiar10017_sample/coordinates.tsv \
        --train-micrographs Falcon_2012_06_12-14_33_35_0 Falcon_2012_06_12-14_57_34_0 \
        --test-micrographs Falcon_2012_06_12-15_07_41_0 Falcon_2012_06_12-15_14_01_0 \
        --radius 54 --downsample 8 --work-dir runs/topaz_compare [--our-picks picks.csv]

Topaz (GPL, https://github.com/tbepler/topaz, ``pip install topaz-em``) is only run as a
program through ``subprocess``; none of its code is here. It gets the same labelled positives as
our picker (``--labelled``: the few particles a user clicked on the training micrographs) and its
picks are scored with our matching (``utils.picking.matching.evaluate_picks``: greedy by score, nearest
unmatched reference centre within ``--radius`` px, per micrograph; AP as Topaz defines it).

Steps and the facts of Topaz 0.3.20 they rely on:

1. Each micrograph (any format ``datasets.micrographs.read_micrograph`` reads) is written as a
   float32 MRC in ``WORK/raw``: Topaz's JPG reader returns a PIL image where an array is expected
   (``preprocess`` fails with "'JpegImageFile' object has no attribute 'astype'"), its MRC
   writer needs an MRC input header, and ``train`` reads its images as MRC only.
2. ``topaz preprocess -s D``: Fourier-crop downsampling by D and GMM normalisation -> ``WORK/
   preprocessed``. Fourier cropping keeps the origin: a centre at pixel x of a W-pixel-wide
   original is at x * w / W in the w = int(W / D) pixel wide result (x / D when D divides W), so
   coordinates go down by w / W and come back by W / w.
3. ``topaz train`` with the GE-binomial objective (its default), resnet8 / 32 units initialised
   from its shipped pretrained model, radius 3, minibatch 256 (its defaults), CPU, for
   ``--epochs`` x ``--epoch-size`` parameter updates (Topaz's default is 10 x 1000; the default
   here, 10 x 200, took 16 minutes with one CPU thread). The last epoch's model is used.
4. ``topaz extract -r R -t T`` on the test micrographs (R: ``--radius`` / D, T: its default -6);
   scores are Topaz's log-likelihood ratios (0 = probability 0.5).

The class prior: ``--expected-particles`` is Topaz's ``-n`` (particles per micrograph). Topaz
0.3.20 turns it into pi = n x P / (pixels per micrograph) with P from ``topaz.stats.
pixels_given_radius``, which counts a 2-D disc 2r+1 times (a 3-D grid summed over z: 203 pixels
instead of 29 at r = 3), and trains the unlabelled part towards pi - p_observed where
p_observed uses the same P. With ``--pi-from expected-particles`` (default) this script passes
``--pi`` so that Topaz's unlabelled target equals (n x images - labelled) x disc / pixels, what
``-n`` is documented to mean; ``--pi-from topaz-n`` passes ``-n`` as a user would.

Installing Topaz beside a CPU-only torch (its own venv, outside the repository): ``pip install
torch==<the local CPU wheel>``, then ``pip install --no-deps topaz-em`` (0.3.20 would pull a newer
CUDA torch), the torchvision release that pins that torch (``--no-deps``), and topaz-em's other
requirements (tqdm h5py numpy pandas psutil scikit-learn scipy pillow future). PyPI's torchvision
wheels are linked against CUDA torch, so their compiled ops do not load and ``import torchvision``
stops at "operator torchvision::nms does not exist"; a launcher that declares the two op schemas
``torchvision::nms`` and ``torchvision::qnms`` (``torch.library.Library("torchvision", "DEF")``)
when the extension cannot load, then calls ``topaz.main.main()``, runs Topaz's CPU path (it only
uses torchvision's pure-Python rotate/flip). Pass that launcher as ``--topaz``.

Writes into ``--work-dir``: the Topaz inputs and logs, ``topaz_picks.csv`` (original pixel
frame), and ``topaz_compare.json`` (settings, command lines, times, all metrics); prints one table.
"""
import argparse
import logging
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

logger = logging.getLogger("topaz_compare")

TOPAZ_DEFAULT_TRAIN_RADIUS = 3
TOPAZ_DEFAULT_EXTRACT_THRESHOLD = -6.0


def build_parser():
    p = argparse.ArgumentParser(
        description="Train and run Topaz on the same labelled particles as our picker, then score "
                    "both with the repository's matching (precision, recall, F1, AP).")
    p.add_argument("--topaz", default="topaz",
                   help="the topaz executable (default: 'topaz' on PATH); it may live in its own venv")
    p.add_argument("--micrographs", required=True,
                   help="folder with the micrographs (MRC/TIFF/PNG/JPG), full size (required)")
    p.add_argument("--labelled", required=True,
                   help="labelled positives of the training micrographs: CSV micrograph,x,y[,score] in "
                        "original pixels (any format datasets.micrographs.read_coordinates reads) (required)")
    p.add_argument("--train-micrographs", nargs="+", required=True, metavar="NAME",
                   help="micrographs Topaz trains on (names with or without suffix) (required)")
    p.add_argument("--test-micrographs", nargs="+", required=True, metavar="NAME",
                   help="micrographs picked and scored (required)")
    p.add_argument("--reference", required=True,
                   help="all true particle centres (STAR/TSV/CSV/BOX); scoring uses the test micrographs' "
                        "rows, the default --expected-particles the training micrographs' rows (required)")
    p.add_argument("--radius", type=float, default=54.0,
                   help="match radius in original pixels: a pick is right when a true centre is this close "
                        "(default: 54, the particle radius of EMPIAR-10017)")
    p.add_argument("--downsample", type=int, default=8,
                   help="Topaz's preprocess -s factor; Topaz wants particles of roughly its receptive field "
                        "(71 px for resnet8) after downsampling (default: 8)")
    p.add_argument("--expected-particles", type=float, default=None,
                   help="particles per micrograph, Topaz's -n (default: the mean count of the reference on the "
                        "training micrographs, standing in for the estimate a user makes by eye)")
    p.add_argument("--pi-from", choices=["expected-particles", "topaz-n"], default="expected-particles",
                   help="expected-particles: pass --pi computed from --expected-particles with a 2-D disc and "
                        "compensated for Topaz's own p_observed (see the module docstring); topaz-n: pass "
                        "-n and let Topaz 0.3.20 compute pi (default: expected-particles)")
    p.add_argument("--method", default="GE-binomial", choices=["GE-binomial", "GE-KL", "PU", "PN"],
                   help="Topaz's training objective (default: GE-binomial, Topaz's default)")
    p.add_argument("--train-radius", type=int, default=TOPAZ_DEFAULT_TRAIN_RADIUS,
                   help="Topaz train -r: downsampled pixels around a labelled centre taken as positive "
                        f"(default: {TOPAZ_DEFAULT_TRAIN_RADIUS}, Topaz's default)")
    p.add_argument("--epochs", type=int, default=10, help="Topaz --num-epochs (default: 10, Topaz's default)")
    p.add_argument("--epoch-size", type=int, default=200,
                   help="Topaz --epoch-size, parameter updates per epoch (default: 200 so that training takes "
                        "about 13 minutes on 2 CPU cores; Topaz's default is 1000)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from Topaz's shipped pretrained resnet8 (default: on, as in Topaz)")
    p.add_argument("--extract-radius", type=int, default=None,
                   help="Topaz extract -r in downsampled pixels: picks closer than this are suppressed "
                        "(default: --radius / --downsample, rounded)")
    p.add_argument("--extract-threshold", type=float, default=TOPAZ_DEFAULT_EXTRACT_THRESHOLD,
                   help="Topaz extract -t: lowest log-likelihood ratio kept, i.e. how far down the PR curve "
                        f"goes (default: {TOPAZ_DEFAULT_EXTRACT_THRESHOLD:g}, Topaz's default, p >= 0.0025)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="Topaz score (log-likelihood ratio) at which P/R/F1 are reported (default: 0, i.e. p = 0.5)")
    p.add_argument("--model-file", default=None,
                   help="use this trained Topaz model (.sav) instead of training one (train time is then not reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="Topaz -j, PyTorch threads; 0 = PyTorch's default, one per core. On 2 shared cores "
                        "-j 0 ran ~10x slower than -j 1 while another job was busy (default: 1)")
    p.add_argument("--work-dir", default="topaz_compare",
                   help="folder for Topaz's inputs, outputs, logs and topaz_compare.json (default: ./topaz_compare)")
    p.add_argument("--our-picks", default=None,
                   help="our picker's picks (CSV micrograph,x,y,score, original pixels) to score side by side")
    p.add_argument("--our-threshold", type=float, default=0.5,
                   help="score threshold for our picks' P/R/F1 (default: 0.5)")
    p.add_argument("--our-label", default="ours", help="row name of our picker in the table (default: ours)")
    p.add_argument("--our-train-seconds", type=float, default=None,
                   help="our training wall time, only copied into the table (default: not shown)")
    p.add_argument("--our-extract-seconds", type=float, default=None,
                   help="our picking wall time per micrograph, only copied into the table (default: not shown)")
    return p


# --------------------------------------------------------------------------- running topaz
def run_topaz(topaz, args, log_path):
    """Run ``topaz ARGS`` with stdout+stderr into ``log_path``; return (wall seconds, command line).

    A non-zero exit raises UserError naming the log and its last line.
    """
    from utils.errors import UserError

    cmd = [str(topaz)] + [str(a) for a in args]
    line = shlex.join(cmd)
    logger.info("$ %s", line)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {line}\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        except OSError as exc:
            raise UserError(f"--topaz {topaz}: cannot run it ({exc}); expected the topaz executable") from None
    seconds = time.perf_counter() - start
    if rc != 0:
        lines = [ln for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
        raise UserError(f"topaz {args[0]} failed with exit code {rc} (log {log_path}): {lines[-1] if lines else ''}")
    return seconds, line


def topaz_python(topaz):
    """The Python interpreter of a ``topaz`` script (its ``#!`` line), or None."""
    path = shutil.which(str(topaz)) or str(topaz)
    try:
        first = Path(path).read_bytes()[:300].split(b"\n", 1)[0].decode()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    return parts[0] if parts else None


def topaz_pixels_per_particle(topaz, radius):
    """What Topaz's ``pixels_given_radius(radius)`` returns, asked from Topaz's own Python.

    Topaz uses it both for pi (from -n) and for p_observed. When it cannot be asked, the 0.3.20
    value (2r+1) x disc is assumed, with a warning.
    """
    python = topaz_python(topaz)
    if python:
        try:
            out = subprocess.run([python, "-c", f"from topaz.stats import pixels_given_radius as f; print(int(f({int(radius)})))"],
                                 capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                return int(out.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            pass
    value = (2 * int(radius) + 1) * disc_pixels(radius)
    logger.warning("could not ask Topaz's pixels_given_radius; assuming %d pixels per particle (Topaz 0.3.20)", value)
    return value


def disc_pixels(radius):
    """Pixels (i, j) of an integer grid with i^2 + j^2 <= radius^2: a 2-D disc, as Topaz masks it."""
    r = int(math.floor(radius))
    return sum(1 for i in range(-r, r + 1) for j in range(-r, r + 1) if i * i + j * j <= radius * radius)


def topaz_version(topaz):
    try:
        out = subprocess.run([str(topaz), "--version"], capture_output=True, text=True, timeout=300)
        return (out.stdout or out.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


# --------------------------------------------------------------------------- data
def resolve(names, by_key, what):
    from datasets.micrographs import micrograph_key
    from utils.errors import UserError

    keys = [micrograph_key(n) for n in names]
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise UserError(f"{what}: {', '.join(missing[:3])} not found among --micrographs; expected one of "
                        f"{', '.join(sorted(by_key)[:4])}")
    return list(dict.fromkeys(keys))


def write_mrc(path, image):
    import mrcfile
    import numpy as np

    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(image, dtype=np.float32))


def mrc_shape(path):
    """(rows, columns) of a 2-D MRC file."""
    import mrcfile

    with mrcfile.open(str(path), permissive=True, header_only=True) as mrc:
        return int(mrc.header.ny), int(mrc.header.nx)


def last_epoch_model(prefix):
    found = []
    for path in prefix.parent.glob(prefix.name + "_epoch*.sav"):
        m = re.search(r"_epoch(\d+)\.sav$", path.name)
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


def parse_p_observed(log_path):
    """(p_observed, num_positive_regions, total_regions) from topaz train's '# 0 train ...' line."""
    for line in Path(log_path).read_text(errors="replace").splitlines():
        m = re.match(r"#\s*\S+\s+train\s+([0-9.eE+-]+)\s+(\d+)\s+(\d+)\s*$", line)
        if m:
            return float(m.group(1)), int(m.group(2)), int(m.group(3))
    return None


# --------------------------------------------------------------------------- main
def fmt(value, digits=3):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def table_row(name, ev, train_s, extract_s):
    o = ev["overall"]
    return [name, fmt(ev["threshold"], 2), fmt(o["precision"]), fmt(o["recall"]), fmt(o["f1"]),
            fmt(o["best_f1_threshold"], 2), fmt(o["best_f1_precision"]), fmt(o["best_f1_recall"]),
            fmt(o["best_f1"]), fmt(o["average_precision"]), str(o["n_picks"]), str(o["n_targets"]),
            fmt(train_s, 0), fmt(extract_s, 1)]


def print_table(rows):
    head = ["method", "thr", "P", "R", "F1", "bestF1 thr", "P@best", "R@best", "best F1", "AP",
            "picks", "targets", "train s", "extract s/mic"]
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main(argv=None):
    from utils.errors import exit_on_user_error

    return exit_on_user_error(_main)(argv)


def _main(argv=None):
    import numpy as np
    import pandas as pd

    from datasets.micrographs import list_micrographs, micrograph_key, read_coordinates, read_micrograph, write_csv
    from utils.errors import UserError
    from utils.picking.matching import evaluate_picks
    from utils.io import write_json

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.downsample < 1 or args.epochs < 1 or args.epoch_size < 1 or args.radius <= 0:
        raise UserError("--downsample, --epochs and --epoch-size must be >= 1 and --radius > 0")
    ds = args.downsample
    work = Path(args.work_dir)
    for sub in ("raw", "preprocessed", "model", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)

    by_key = {micrograph_key(p.name): p for p in list_micrographs([args.micrographs])}
    train_keys = resolve(args.train_micrographs, by_key, "--train-micrographs")
    test_keys = resolve(args.test_micrographs, by_key, "--test-micrographs")
    both = sorted(set(train_keys) & set(test_keys))
    if both:
        raise UserError(f"--train-micrographs and --test-micrographs share {', '.join(both)}; expected disjoint sets")

    reference, ref_info = read_coordinates(args.reference)
    logger.info("%s", ref_info)
    labelled, lab_info = read_coordinates(args.labelled)
    logger.info("%s", lab_info)
    lab_keys = labelled["micrograph"].astype(str).map(micrograph_key)
    outside = ~lab_keys.isin(train_keys)
    if outside.any():
        logger.warning("%s: %d labelled rows are not on the training micrographs and are ignored",
                       args.labelled, int(outside.sum()))
    labelled = labelled[~outside].assign(key=lab_keys[~outside])
    if len(labelled) == 0:
        raise UserError(f"{args.labelled}: no labelled particle on the training micrographs "
                        f"({', '.join(train_keys)}); expected micrograph names matching them")
    ref_keys = reference["micrograph"].astype(str).map(micrograph_key)
    counts = {k: int((ref_keys == k).sum()) for k in train_keys}
    expected = args.expected_particles
    if expected is None:
        expected = float(np.mean(list(counts.values())))
        logger.info("expected particles per micrograph (Topaz -n) = %.1f: mean reference count on the "
                    "training micrographs %s", expected, counts)
    if expected <= 0:
        raise UserError(f"--expected-particles {expected}: expected a positive number of particles per micrograph")

    topaz = args.topaz
    if shutil.which(str(topaz)) is None:
        raise UserError(f"--topaz {topaz}: no such executable; expected the topaz program "
                        "(pip install topaz-em, or the path to a venv's bin/topaz)")
    version = topaz_version(topaz)
    logger.info("topaz: %s (%s)", topaz, version)

    # 1. full-size float32 MRCs (Topaz reads MRC reliably); 2. topaz preprocess
    sizes, raw_paths = {}, []
    for key in train_keys + test_keys:
        image = read_micrograph(by_key[key])
        sizes[key] = image.shape
        raw = work / "raw" / f"{key}.mrc"
        write_mrc(raw, image)
        raw_paths.append(raw)
    pre_dir = work / "preprocessed"
    pre_s, pre_cmd = run_topaz(topaz, ["preprocess", "-s", ds, "-d", -1, "-j", args.threads, "-o", pre_dir]
                               + raw_paths, work / "logs" / "preprocess.log")
    pre = {k: (pre_dir / f"{k}.mrc").resolve() for k in sizes}
    for k, path in pre.items():
        if not path.is_file():
            raise UserError(f"topaz preprocess wrote no {path}; see {work / 'logs' / 'preprocess.log'}")
    for raw in raw_paths:
        raw.unlink()  # 64 MB each at 4096^2; the preprocessed copies are what Topaz uses
    small = {k: mrc_shape(path) for k, path in pre.items()}
    # original pixels per downsampled pixel along (y, x): D when D divides the size
    scale = {k: (sizes[k][0] / small[k][0], sizes[k][1] / small[k][1]) for k in sizes}

    # 3. training files in the downsampled frame, Topaz's tab-separated tables
    train_images = work / "train_images.txt"
    pd.DataFrame({"image_name": train_keys, "path": [str(pre[k]) for k in train_keys]}).to_csv(
        train_images, sep="\t", index=False)
    train_targets = work / "train_targets.txt"
    keys = labelled["key"].to_numpy()
    sy = np.array([scale[k][0] for k in keys])
    sx = np.array([scale[k][1] for k in keys])
    h = np.array([small[k][0] for k in keys])
    w = np.array([small[k][1] for k in keys])
    pd.DataFrame({"image_name": keys,
                  "x_coord": np.clip(np.rint(labelled["x"].to_numpy() / sx), 0, w - 1).astype(int),
                  "y_coord": np.clip(np.rint(labelled["y"].to_numpy() / sy), 0, h - 1).astype(int)}).to_csv(
        train_targets, sep="\t", index=False)

    total = sum(small[k][0] * small[k][1] for k in train_keys)
    n_lab = len(labelled)
    disc = disc_pixels(args.train_radius)
    topaz_p = topaz_pixels_per_particle(topaz, args.train_radius)
    intended_unlabelled = (expected * len(train_keys) - n_lab) * disc / total
    prior = {"expected_particles": expected, "reference_counts_train": counts, "n_labelled": n_lab,
             "disc_pixels": disc, "topaz_pixels_per_particle": topaz_p, "total_pixels": total,
             "intended_pi": expected * len(train_keys) * disc / total,
             "intended_unlabelled_positive_fraction": intended_unlabelled}
    if args.pi_from == "expected-particles":
        pi = intended_unlabelled + n_lab * topaz_p / total
        prior_args = ["--pi", f"{pi:.6g}"]
    else:
        pi = expected * len(train_keys) * topaz_p / total
        prior_args = ["-n", f"{expected:g}"]
    prior.update(pi_from=args.pi_from, topaz_pi=pi, topaz_unlabelled_target=pi - n_lab * topaz_p / total)
    logger.info("prior: %s", prior)

    train_s, train_cmd = None, None
    if args.model_file:
        model = Path(args.model_file)
        if not model.is_file():
            raise UserError(f"--model-file {model}: file does not exist")
    else:
        prefix = work / "model" / "model"
        for old in prefix.parent.glob("model_epoch*.sav"):
            old.unlink()
        train_log = work / "logs" / "train.log"
        train_s, train_cmd = run_topaz(topaz, [
            "train", "-d", -1, "-j", args.threads, "--num-workers", 0,
            "--train-images", train_images, "--train-targets", train_targets,
            "--method", args.method, "-r", args.train_radius, *prior_args,
            "--num-epochs", args.epochs, "--epoch-size", args.epoch_size,
            "--pretrained" if args.pretrained else "--no-pretrained",
            "--save-prefix", prefix, "-o", work / "model" / "train_curve.txt"], train_log)
        model = last_epoch_model(prefix)
        if model is None:
            raise UserError(f"topaz train saved no model under {prefix}_epoch*.sav; see {train_log}")
        seen = parse_p_observed(train_log)
        if seen is not None:
            prior["topaz_reported_p_observed"] = seen[0]
            if seen[1] != n_lab * topaz_p:
                logger.warning("Topaz counted %d positive pixels, expected %d x %d: the pi compensation "
                               "may be off", seen[1], n_lab, topaz_p)

    # 4. topaz extract on the test micrographs
    extract_r = args.extract_radius if args.extract_radius is not None else max(1, int(round(args.radius / ds)))
    raw_picks = work / "topaz_picks_downsampled.txt"
    extract_s, extract_cmd = run_topaz(topaz, [
        "extract", "-m", model, "-r", extract_r, "-t", args.extract_threshold, "-d", -1,
        "-j", args.threads, "-o", raw_picks] + [pre[k] for k in test_keys], work / "logs" / "extract.log")
    found = pd.read_csv(raw_picks, sep="\t")
    names = found["image_name"].astype(str).to_numpy()
    picks = pd.DataFrame({"micrograph": names,
                          "x": found["x_coord"].to_numpy(dtype=float) * np.array([scale[k][1] for k in names]),
                          "y": found["y_coord"].to_numpy(dtype=float) * np.array([scale[k][0] for k in names]),
                          "score": found["score"].to_numpy(dtype=float)})
    write_csv(work / "topaz_picks.csv", picks)

    # scoring with the repository's matching
    topaz_eval = evaluate_picks(picks, reference, args.radius, args.threshold, micrographs=test_keys)
    extract_per = extract_s / len(test_keys)
    rows = [table_row(f"topaz {version.split()[-1] if version != 'unknown' else ''}".strip(), topaz_eval,
                      train_s, extract_per)]
    results = {"topaz": {"version": version, "evaluation": topaz_eval, "train_seconds": train_s,
                         "preprocess_seconds": pre_s, "extract_seconds_total": extract_s,
                         "extract_seconds_per_micrograph": extract_per, "model": str(model),
                         "commands": {"preprocess": pre_cmd, "train": train_cmd, "extract": extract_cmd},
                         "prior": prior, "extract_radius_downsampled": extract_r}}
    if args.our_picks:
        ours, ours_info = read_coordinates(args.our_picks)
        logger.info("%s", ours_info)
        our_eval = evaluate_picks(ours, reference, args.radius, args.our_threshold, micrographs=test_keys)
        rows.append(table_row(args.our_label, our_eval, args.our_train_seconds, args.our_extract_seconds))
        results["ours"] = {"picks": str(args.our_picks), "evaluation": our_eval,
                           "train_seconds": args.our_train_seconds,
                           "extract_seconds_per_micrograph": args.our_extract_seconds}
    results["settings"] = {k: v for k, v in vars(args).items()}
    results["split"] = {"train": train_keys, "test": test_keys, "sizes": {k: list(v) for k, v in sizes.items()}}
    write_json(work / "topaz_compare.json", results)

    print(f"\nradius {args.radius:g} px, test micrographs {', '.join(test_keys)}; topaz threshold = "
          f"log-likelihood ratio, extract s/mic includes Topaz's start-up; preprocess {pre_s:.0f} s for "
          f"{len(sizes)} micrographs")
    print_table(rows)
    print(f"\nwrote {work / 'topaz_compare.json'}")
    return results


if __name__ == "__main__":
    main()
