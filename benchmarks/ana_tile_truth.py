"""Do the self-paced weights find the tile behind each label? main.py on generated MIML images
whose every tile's own labels are known.

    python benchmarks/ana_tile_truth.py --device cuda --sweep --out tile_truth.json   # GPU size
    python benchmarks/ana_tile_truth.py --size cpu --seeds 2                           # CPU size
    python benchmarks/ana_tile_truth.py --smoke                                        # seconds, CPU

The images come from ``datasets.synthetic_ana`` (cells of 1-3 ANA-like patterns per image,
2 x 2 tiles, each tile showing a known non-empty subset of its image's labels:
``TILE_TARGETS``). Every run is ``main.main([...])``, the command users run, with the README's
full-model flags; three methods, each with model selection on val tiles (``--valLevel tile``,
the reference's) and on val images (``--valLevel image``), over several seeds:

- **baseline**: plain BCE on the bag labels (``--weight_lr 0 --trainingLabel real``);
- **adam**: the full model with the reference's weight optimiser (``--weight_lr`` = ``--lr``,
  as the README's full-model command);
- **sgd**: the full model with ``--weightOptimizer sgd`` at its default weight lr.

Measures, mean +- sd over the seeds:

- **weight AUC (k labels)**: over the positive (tile, label) pairs of the training images with
  k labels, the ROC AUC of the weight at the end of training (``instance_weights_last.csv``)
  for "this tile shows this label";
- **tile AUC**: macro ROC AUC over the classes of the per-tile test probabilities of the
  reported model (``test_tile_predictions.csv``) against the tiles' own labels;
- **image level**: the run's reported test F1-micro, F1-macro, subset accuracy and mAP
  (the test evaluation of its last epoch that improved a val metric).

``--sweep`` also trains the sgd full model at other weight learning rates (``--valLevel tile``,
the first ``--sweep-seeds`` seeds) and prints the same numbers per learning rate: how
``SGD_WEIGHT_LR`` of config.py was chosen. Each run's time goes to stderr.
Prints Markdown tables at the end; ``--out`` writes every number as JSON.
"""
import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

import config
import main as ana_main
from datasets.synthetic_ana import generate_ana_demo
from utils.errors import UserError, exit_on_user_error

# name -> (n_train, n_val, n_test images, classes, tile px, network input px, epochs, batch)
SIZES = {
    "smoke": dict(n_train=8, n_val=4, n_test=4, classes=4, tile=32, image=32, epochs=1, batch=8),
    "cpu": dict(n_train=96, n_val=24, n_test=40, classes=6, tile=64, image=32, epochs=10, batch=16),
    "gpu": dict(n_train=240, n_val=60, n_test=100, classes=6, tile=96, image=64, epochs=10, batch=32),
}
LR = 1e-3  # network lr of the README's full-model command (which also gives --weight_lr 1e-3)
FULL = ("--initWeight", "iw-sample", "--updateLR", "ulr-adaptive", "--granularity", "label", "--sampling",
        "--trainingLabel", "pseudo")
METHODS = {
    "baseline": ("--weight_lr", "0", "--trainingLabel", "real"),
    "adam": (*FULL, "--weight_lr", str(LR)),
    "sgd": (*FULL, "--weightOptimizer", "sgd"),
}
SWEEP_LRS = (0.01, 0.03, 0.05, 0.1, 0.3)
LEVELS = ("tile", "image")
MEASURES = ("weight_auc_2", "weight_auc_3", "tile_auc", "f1_mi", "f1_ma", "acc_total", "mAP")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda (default: %(default)s)")
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="data and training size (default: gpu on a GPU, else cpu); "
                        + "; ".join(f"{k}: {v['n_train']}/{v['n_val']}/{v['n_test']} images, {v['classes']} classes, "
                                    f"{v['epochs']} epochs" for k, v in SIZES.items()))
    p.add_argument("--smoke", action="store_true", help="--size smoke, 1 seed, 2 sweep lrs: seconds on a CPU")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: 3; smoke: 1)")
    p.add_argument("--sweep", action="store_true", help="also the sgd weight-lr sweep")
    p.add_argument("--sweep-seeds", type=int, default=2,
                   help="seeds per learning rate of --sweep, the first of --seeds' (default: %(default)s)")
    p.add_argument("--sweep-lrs", type=float, nargs="+", default=None,
                   help=f"weight lrs of --sweep (default: {' '.join(map(str, SWEEP_LRS))})")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS),
                   help="methods to train (default: all)")
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS),
                   help="--valLevel settings (default: both)")
    p.add_argument("--work-dir", default=None, help="keep data and runs here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write every number to this JSON file")
    return p


def tile_truth(csv_path):
    """``{image path: [set of classes of tile 0, tile 1, ...]}`` from the generator's TILE_TARGETS."""
    df = pd.read_csv(csv_path)
    return {row.path: [set(map(int, t.split())) for t in row.TILE_TARGETS.split(";")] for row in df.itertuples()}


def _auc(truth, score):
    truth = np.asarray(truth, dtype=bool)
    return float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else math.nan


def weight_aucs(instance_csv, truth):
    """ROC AUC of the weights of the positive pairs of k-label training images, k = 2, 3."""
    frame = pd.read_csv(instance_csv, dtype={"bag_labels": str})
    frame["shows"] = [int(c) in truth[p][t] for p, t, c in zip(frame["path"], frame["tile"], frame["class"])]
    k = frame["bag_labels"].str.split().map(len)
    return {f"weight_auc_{n}": _auc(frame.loc[k == n, "shows"], frame.loc[k == n, "weight"]) for n in (2, 3)}


def tile_auc(pred_csv, truth, num_classes):
    """Macro ROC AUC over the classes (those with positive and negative test tiles) of per-tile probabilities."""
    frame = pd.read_csv(pred_csv)
    y = np.array([[c in truth[p][t] for c in range(num_classes)] for p, t in zip(frame["path"], frame["tile"])])
    probs = frame[[f"prob_{c}" for c in range(num_classes)]].to_numpy()
    aucs = [_auc(y[:, c], probs[:, c]) for c in range(num_classes)]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def train_one(data, work, size, device, method_flags, level, seed, name):
    """One main.py run; returns its measures."""
    run_dir = work / "runs" / name
    argv = ["--annFile", str(data / "annotations.csv"), "--imageDir", str(data / "images"),
            "--numClasses", str(size["classes"]), "--arch", "resnet18", "--imageSize", str(size["image"]),
            "--tileSize", str(size["tile"]), "--no-pretrained", "--numWorkers", "0",
            "--trainBatchSize", str(size["batch"]), "--testBatchSize", "256", "--epoch", str(size["epochs"]),
            "--lr", str(LR), "--seed", str(seed), "--valLevel", level, "--device", device,
            "--cacheDir", str(work / "cache"), "--pathModelParams", str(run_dir), *method_flags]
    start = time.perf_counter()
    result = ana_main.main(argv)
    print(f"ana_tile_truth: {name} trained in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    truth = tile_truth(data / "annotations.csv")
    out = weight_aucs(run_dir / "instance_weights_last.csv", truth)
    out["tile_auc"] = tile_auc(run_dir / "test_tile_predictions.csv", truth, size["classes"])
    out.update({k: float(result["test"][k]) for k in ("f1_mi", "f1_ma", "acc_total", "mAP")})
    return out


def summarise(runs):
    """mean and sd (ddof 1) over the seeds of each measure (NaN-free values only)."""
    out = {}
    for key in MEASURES:
        values = [r[key] for r in runs if not math.isnan(r[key])]
        out[key] = {"mean": float(np.mean(values)) if values else math.nan,
                    "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan, "n": len(values)}
    return out


def _cell(stat):
    if math.isnan(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.3f}" + ("" if math.isnan(stat["sd"]) else f" ± {stat['sd']:.3f}")


def markdown(rows, first):
    head = [first, "weight AUC 2-label", "weight AUC 3-label", "tile AUC", "F1mi", "F1ma", "subset acc", "mAP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, summary in rows:
        lines.append("| " + " | ".join([label] + [_cell(summary[k]) for k in MEASURES]) + " |")
    return "\n".join(lines)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def run_benchmark(args, work):
    size = SIZES["smoke" if args.smoke else args.size]
    seeds = list(range(args.seeds))
    sweep_lrs = args.sweep_lrs or ((0.01, 0.3) if args.smoke else SWEEP_LRS)
    data = work / "data"
    if not (data / "annotations.csv").is_file():
        generate_ana_demo(data, n_train=size["n_train"], n_val=size["n_val"], n_test=size["n_test"], tiles_x=2,
                          tiles_y=2, tile_size=size["tile"], num_classes=size["classes"], max_labels=3, seed=1234)
    start = time.perf_counter()
    results = {"size": {**size, "seeds": len(seeds), "sweep_seeds": min(args.sweep_seeds, len(seeds)),
                        "device": args.device}, "methods": {}, "sweep": {}}
    for method in args.methods:
        for level in args.levels:
            runs = [train_one(data, work, size, args.device, METHODS[method], level, seed, f"{method}_{level}_s{seed}")
                    for seed in seeds]
            results["methods"][f"{method} / valLevel {level}"] = {"runs": runs, "summary": summarise(runs)}
    if args.sweep:
        for lr in sweep_lrs:
            runs = []
            for seed in seeds[:args.sweep_seeds]:
                reuse = results["methods"].get("sgd / valLevel tile")
                if reuse and math.isclose(lr, config.SGD_WEIGHT_LR):  # the default: already trained
                    runs.append(reuse["runs"][seed])
                    continue
                runs.append(train_one(data, work, size, args.device, (*METHODS["sgd"], "--weight_lr", str(lr)),
                                      "tile", seed, f"sgd_lr{lr:g}_s{seed}"))
            results["sweep"][f"{lr:g}"] = {"runs": runs, "summary": summarise(runs)}
    results["seconds"] = time.perf_counter() - start
    return results


def report(results):
    s = results["size"]
    lines = [f"ana_tile_truth: {s['n_train']}/{s['n_val']}/{s['n_test']} train/val/test images of 2x2 tiles "
             f"({s['tile']} px, network input {s['image']} px), {s['classes']} classes, 1-3 labels per image, "
             f"resnet18 from scratch, {s['epochs']} epochs (patience 4), batch {s['batch']}, lr {LR:g}, "
             f"{s['seeds']} seed(s), device {s['device']}; {results['seconds']:.0f} s", "",
             markdown([(k, v["summary"]) for k, v in results["methods"].items()], "method / model selection")]
    if results["sweep"]:
        lines += ["", f"sgd weight-lr sweep (full model, valLevel tile, {s['sweep_seeds']} seed(s); "
                      f"default {config.SGD_WEIGHT_LR:g}):", "",
                  markdown([(f"sgd --weight_lr {k}", v["summary"]) for k, v in results["sweep"].items()],
                           "setting")]
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
    """Parse ``argv``, train every setting, print the tables; return the numbers as a dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size is None:
        args.size = "gpu" if args.device.startswith("cuda") else "cpu"
    if args.seeds is None:
        args.seeds = 1 if args.smoke else 3
    if args.seeds < 1 or args.sweep_seeds < 1:
        parser.error(f"--seeds {args.seeds} / --sweep-seeds {args.sweep_seeds}: expected at least 1")
    if args.sweep_lrs and any(not (math.isfinite(lr) and lr >= 0) for lr in args.sweep_lrs):
        parser.error(f"--sweep-lrs {args.sweep_lrs}: expected finite numbers >= 0")
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; expected a JSON file path")
    if args.work_dir:
        results = run_benchmark(args, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="ana_tile_truth_") as tmp:
            results = run_benchmark(args, Path(tmp))
    text = report(results)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
