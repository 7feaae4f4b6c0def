"""What makes the picker accurate on EMPIAR-10017: the whole pipeline per setting, one Markdown table.

    python benchmarks/empiar_study.py --data ../shared/data/empiar10017_sample --work-dir runs/empiar_study \
        --out runs/empiar_study/study.json --device cuda --seeds 42 1 2 --budget-s 200
    python benchmarks/empiar_study.py --smoke        # tiny generated micrographs, seconds on the CPU

Each row runs the repository's own commands in-process: ``preprocess_cryoem.main`` (downsampling 2,
64 px windows, the labelled fraction and context of the row, unlabelled stride 64) ->
``train_pu_selective_fixmatch.main`` (``configs/empiar10017_sample.yaml``, the row's epochs) ->
``pick_particles.main`` on the held-out micrographs (the row's stride, TTA, NMS distance, refinement,
teacher or student; ``--score-floor 0`` so that every candidate is ranked) -> the matching of
``evaluate_picks.py`` (:func:`utils.picking.matching.evaluate_picks`) at radius 54 px. As in
benchmarks/README.md, "Picking on EMPIAR-10017": train on the first 2 micrographs (10% of their
particles labelled), test on the other 2. Rows that change only the picking reuse the model of their
training setting (one per seed); preprocessed data are shared between rows that need the same.

Columns: AP and the best F1 over all thresholds; F1 at the threshold ``--threshold auto`` chooses
(the default); mean / 90th-percentile distance of the matched picks at that threshold to the
annotated centres (px of the original micrographs); training time; picking time per micrograph
(``pick_particles.py``'s own, reading included). With several seeds: the mean, and the standard
deviation after the AP.

Rows are run in the order of :data:`ROWS` (most informative first); ``--budget-s`` stops before a row
that would not fit (a training row is estimated from the first training's time) and the table of the
rows done is printed anyway; ``--out`` receives every result as JSON after each row.
"""
import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import pick_particles
import preprocess_cryoem
import train_pu_selective_fixmatch
from datasets.micrographs import list_micrographs, micrograph_key, read_coordinates
from utils.errors import UserError, exit_on_user_error
from utils.io import write_json
from utils.picking.matching import evaluate_picks

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "empiar10017_sample.yaml"


@dataclass(frozen=True)
class Train:
    """What a training setting changes (preprocessing and training)."""
    fraction: float = 0.1
    context: int = 64
    epochs: int = 8
    val_micrograph: bool = False  # hold the second training micrograph out as a labelled val set


@dataclass(frozen=True)
class Pick:
    """What a picking setting changes."""
    stride: int = 16
    tta: bool = False
    nms: float = 1.0  # NMS distance in particle radii
    refine: bool = True
    model: str = "model"  # the EMA teacher, or "student"


BASE_TRAIN, BASE_PICK = Train(), Pick()
# (name, training, picking), most informative first: training rows early (the picking rows were
# measured on the CPU, benchmarks/README.md); the picking rows reuse the base model of each seed
ROWS = (
    ("base: README pipeline (10% labelled, 8 epochs, context 64; stride 16)", BASE_TRAIN, BASE_PICK),
    ("TTA (8 rotations/flips)", BASE_TRAIN, replace(BASE_PICK, tta=True)),
    ("every annotated particle labelled", replace(BASE_TRAIN, fraction=1.0), BASE_PICK),
    ("24 epochs", replace(BASE_TRAIN, epochs=24), BASE_PICK),
    ("model selection on a labelled val micrograph (trains on 1)", replace(BASE_TRAIN, val_micrograph=True),
     BASE_PICK),
    ("context 32", replace(BASE_TRAIN, context=32), BASE_PICK),
    ("every particle labelled, 24 epochs", replace(BASE_TRAIN, fraction=1.0, epochs=24), BASE_PICK),
    ("every particle labelled, 24 epochs, TTA", replace(BASE_TRAIN, fraction=1.0, epochs=24),
     replace(BASE_PICK, tta=True)),
    ("stride 8", BASE_TRAIN, replace(BASE_PICK, stride=8)),
    ("stride 32", BASE_TRAIN, replace(BASE_PICK, stride=32)),
    ("NMS distance 1.5 r", BASE_TRAIN, replace(BASE_PICK, nms=1.5)),
    ("NMS distance 2 r", BASE_TRAIN, replace(BASE_PICK, nms=2.0)),
    ("student instead of teacher", BASE_TRAIN, replace(BASE_PICK, model="student")),
    ("no sub-cell refinement", BASE_TRAIN, replace(BASE_PICK, refine=False)),
    ("TTA, stride 8", BASE_TRAIN, replace(BASE_PICK, tta=True, stride=8)),
    ("TTA, stride 32", BASE_TRAIN, replace(BASE_PICK, tta=True, stride=32)),
)


@dataclass(frozen=True)
class Geometry:
    """The data and its scale: real EMPIAR-10017 or the smoke test's generated micrographs."""
    micrographs: Path
    coordinates: Path
    train: tuple
    test: tuple
    radius: float
    downsample: float
    window: int
    stride: int


def build_parser():
    p = argparse.ArgumentParser(description="Accuracy and speed of the CryoEM picker per setting on EMPIAR-10017: "
                                            "preprocess -> train -> pick -> evaluate, one Markdown table.")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "empiar10017_sample"),
                   help="folder with micrographs/ and coordinates.star (default: %(default)s)")
    p.add_argument("--work-dir", default="runs/empiar_study", help="data, runs and picks go here (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON file of all results (default: <work-dir>/study.json)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds (default: %(default)s)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="run only these rows (0-based indices into the list --list-rows prints)")
    p.add_argument("--list-rows", action="store_true", help="print the rows and exit")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop before a row that would end after this many seconds (default: no limit)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the config's 32)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers of training (default: 4 on a GPU, 0 on the CPU)")
    p.add_argument("--base-checkpoint", default=None,
                   help="best_model.pt trained with the base setting: used for the base rows of the first seed "
                        "instead of training it (its training time is then unknown)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny generated micrographs, 1-epoch training, a few rows: checks the script in seconds")
    return p


def _geometry(args, work):
    if args.smoke:
        from datasets.synthetic_micrographs import generate_micrograph_demo
        raw = generate_micrograph_demo(work / "raw", n_micrographs=4, size=320, particle_radius=16, n_particles=25,
                                       n_decoys=8, noise=0.3, seed=3)
        return Geometry(work / "raw" / "micrographs", raw["star"], ("mic_00", "mic_01"), ("mic_02", "mic_03"),
                        radius=16, downsample=2, window=32, stride=16)
    data = Path(args.data)
    if not (data / "micrographs").is_dir() or not (data / "coordinates.star").is_file():
        raise UserError(f"--data {data}: expected a folder with micrographs/ and coordinates.star "
                        f"(../shared/data/empiar10017_sample)")
    keys = [micrograph_key(p.name) for p in list_micrographs(data / "micrographs")]
    if len(keys) < 3:
        raise UserError(f"--data {data}: {len(keys)} micrographs, expected at least 3 (2 train, the rest test)")
    return Geometry(data / "micrographs", data / "coordinates.star", tuple(keys[:2]), tuple(keys[2:]),
                    radius=54, downsample=2, window=64, stride=64)


class Study:
    """Runs rows, caching preprocessed data per training setting and models per (training, seed)."""

    def __init__(self, args, geo, work, device, t_start):
        self.args, self.geo, self.work, self.device, self.t_start = args, geo, work, device, t_start
        self.data, self.models = {}, {}
        self.reference = read_coordinates(geo.coordinates)[0]
        self.train_s_per_epoch = None
        self.preprocess_s = None

    def _data_dir(self, t):
        key = (t.fraction, t.context, t.val_micrograph)
        if key not in self.data:
            out = self.work / f"data_f{t.fraction:g}_c{t.context}{'_val' if t.val_micrograph else ''}"
            if not (out / "preprocess.json").is_file():
                g = self.geo
                argv = ["--micrographs", str(g.micrographs), "--coordinates", str(g.coordinates),
                        "--particle-radius", str(g.radius), "--downsample", str(g.downsample),
                        "--patch-size", str(g.window), "--context", str(t.context), "--stride", str(g.stride),
                        "--labelled-fraction", str(t.fraction), "--test-micrographs", *g.test,
                        "--output-dir", str(out), "--overwrite"]
                if t.val_micrograph:
                    argv += ["--val-micrographs", g.train[1]]
                t0 = time.perf_counter()
                preprocess_cryoem.main(argv)
                self.preprocess_s = self.preprocess_s or time.perf_counter() - t0
            self.data[key] = out
        return self.data[key]

    def model(self, t, seed):
        """``(best_model.pt, training seconds or None)`` for training setting ``t`` and ``seed``."""
        if (t, seed) in self.models:
            return self.models[(t, seed)]
        if t == BASE_TRAIN and seed == self.args.seeds[0] and self.args.base_checkpoint:
            self.models[(t, seed)] = (Path(self.args.base_checkpoint), None)
            return self.models[(t, seed)]
        data = self._data_dir(t)
        name = f"f{t.fraction:g}_c{t.context}_e{t.epochs}{'_val' if t.val_micrograph else ''}_s{seed}"
        run_dir = self.work / "runs" / name
        if not (run_dir / "best_model.pt").is_file():
            workers = self.args.num_workers if self.args.num_workers is not None else (
                4 if self.device.startswith("cuda") else 0)
            argv = ["--config", str(CONFIG), "--data-dir", str(data), "--output-dir", str(self.work / "runs"),
                    "--exp-name", name, "--epochs", str(1 if self.args.smoke else t.epochs), "--seed", str(seed),
                    "--device", self.device, "--num-workers", str(workers)]
            if self.args.batch_size:
                argv += ["--batch-size", str(self.args.batch_size)]
            t0 = time.perf_counter()
            train_pu_selective_fixmatch.main(argv)
            seconds = time.perf_counter() - t0
            if self.train_s_per_epoch is None:
                self.train_s_per_epoch = seconds / (1 if self.args.smoke else t.epochs)
        else:
            seconds = None
        self.models[(t, seed)] = (run_dir / "best_model.pt", seconds)
        return self.models[(t, seed)]

    def estimate_s(self, t, seed):
        """Seconds a row would take: training (when its model is not there yet) plus picking."""
        pick = 60.0 if self.args.smoke else 30.0 * len(self.geo.test)
        if (t, seed) in self.models or (t == BASE_TRAIN and seed == self.args.seeds[0] and self.args.base_checkpoint):
            return pick
        if self.train_s_per_epoch is None:
            return pick
        new_data = (t.fraction, t.context, t.val_micrograph) not in self.data
        return pick + (self.preprocess_s or 0.0) * new_data + self.train_s_per_epoch * (1 if self.args.smoke
                                                                                         else t.epochs)

    def pick(self, name, t, p, seed):
        ckpt, train_s = self.model(t, seed)
        g = self.geo
        out = self.work / "picks" / name
        paths = [str(q) for q in list_micrographs(g.micrographs) if micrograph_key(q.name) in g.test]
        argv = ["--checkpoint", str(ckpt), "--micrographs", *paths, "--output-dir", str(out),
                "--stride", str(p.stride), "--min-distance", str(p.nms * g.radius), "--score-floor", "0",
                "--model", p.model, "--device", self.device, "--tta" if p.tta else "--no-tta",
                "--refine" if p.refine else "--no-refine"]
        summary = pick_particles.main(argv)
        candidates = read_coordinates(out / "candidates.star")[0]
        ev = evaluate_picks(candidates, self.reference, g.radius, summary["threshold"], micrographs=g.test)["overall"]
        return {"ap": ev["average_precision"], "best_f1": ev["best_f1"], "f1_default": ev["f1"],
                "precision_default": ev["precision"], "recall_default": ev["recall"],
                "threshold": summary["threshold"], "distance_mean": ev["distance_mean"],
                "distance_p90": ev["distance_p90"], "train_s": train_s,
                "pick_s_per_micrograph": summary["seconds_per_micrograph"], "n_picks": summary["n_picks"]}


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else None


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(results):
    """The Markdown table of ``results`` (one entry per row, each with its runs per seed)."""
    lines = ["| setting | seeds | AP | best F1 | F1 at the default threshold | distance mean / p90 (px) | "
             "training (s) | picking (s / micrograph) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        runs = r["runs"]
        if not runs:
            continue
        col = {k: _mean([x[k] for x in runs]) for k in runs[0] if k != "seed"}
        aps = [x["ap"] for x in runs]
        sd = f" ± {statistics.stdev(aps):.3f}" if len(aps) > 1 else ""
        lines.append(f"| {r['name']} | {len(runs)} | {_fmt(col['ap'], '.3f')}{sd} | {_fmt(col['best_f1'], '.3f')} | "
                     f"{_fmt(col['f1_default'], '.3f')} | {_fmt(col['distance_mean'], '.1f')} / "
                     f"{_fmt(col['distance_p90'], '.1f')} | {_fmt(col['train_s'], '.0f')} | "
                     f"{_fmt(col['pick_s_per_micrograph'], '.2f')} |")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    rows = ROWS
    if args.list_rows:
        for i, (name, t, p) in enumerate(rows):
            print(f"{i:2d}  {name}  {asdict(t)}  {asdict(p)}")
        return {"rows": [r[0] for r in rows]}
    if args.rows:
        bad = [i for i in args.rows if not 0 <= i < len(rows)]
        if bad:
            raise UserError(f"--rows {bad[0]}: expected indices 0..{len(rows) - 1} (see --list-rows)")
        rows = [rows[i] for i in args.rows]
    elif args.smoke:
        rows = [ROWS[i] for i in (0, 1, 9, 2)]
    t_start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out_path = Path(args.out) if args.out else work / "study.json"
    study = Study(args, _geometry(args, work), work, device, t_start)
    results, stopped = [], None
    for index, (name, t, p) in enumerate(rows):
        entry = {"name": name, "train": asdict(t), "pick": asdict(p), "runs": []}
        results.append(entry)
        for seed in args.seeds:
            elapsed = time.perf_counter() - t_start
            if args.budget_s is not None and elapsed + study.estimate_s(t, seed) > args.budget_s:
                stopped = f"budget: stopped after {elapsed:.0f} s, before '{name}' seed {seed}"
                break
            tag = f"{index:02d}_s{seed}"
            run = study.pick(tag, t, p, seed)
            entry["runs"].append({"seed": seed, **run})
            print(f"{name} (seed {seed}): AP {run['ap']:.3f}, best F1 {run['best_f1']:.3f}, F1 at the default "
                  f"threshold {run['f1_default']:.3f}, {run['pick_s_per_micrograph']:.2f} s per micrograph",
                  file=sys.stderr, flush=True)
            write_json(out_path, {"device": device, "seeds": args.seeds, "smoke": args.smoke, "results": results,
                                  "stopped": stopped, "elapsed_s": time.perf_counter() - t_start})
        if stopped:
            break
    summary = {"device": device, "seeds": args.seeds, "smoke": args.smoke, "results": results, "stopped": stopped,
               "elapsed_s": time.perf_counter() - t_start, "table": table(results)}
    write_json(out_path, summary)
    print(summary["table"])
    if stopped:
        print(f"\n({stopped})")
    return summary


if __name__ == "__main__":
    main()
