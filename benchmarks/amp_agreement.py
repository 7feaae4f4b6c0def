"""Do results with and without mixed precision agree? Each family's demo training twice, one table each.

    python benchmarks/amp_agreement.py                                 # CPU: bf16 autocast forced on
    python benchmarks/amp_agreement.py --device cuda                   # GPU: the trainers' own AMP choice
    python benchmarks/amp_agreement.py --family ana --ana-epochs 4     # one family

For each family (``--family``, default both) the trainer's own run function trains twice on
generated demo data, same seed, once in float32 and once with mixed precision, and the test
metrics of both and their differences are printed:

* ``cryoem``: ``train_pu_selective_fixmatch.py``'s training (``train_pu_selective_fixmatch.run``) on the
  CryoEM demo data (``make_demo_data.py --family cryoem``, written to ``--data-dir`` when
  missing), ``training.amp`` false and true;
* ``ana``: ``main.py``'s full model (``main.run``) on a small generated MIML set
  (written to ``--ana-data-dir`` when missing), ``--no-amp`` and ``--amp``.

On a GPU the trainers pick bf16 (or fp16 with loss scaling) themselves. On the CPU the trainers
never use AMP, so this script turns on bfloat16 autocast there (the numeric format a bf16 GPU
uses; the kernels differ) to exercise the same code path.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import config  # noqa: E402
from datasets.synthetic_ana import generate_ana_demo  # noqa: E402
from datasets.synthetic_cryoem import generate_cryoem_demo  # noqa: E402
from main import build_parser as build_main_parser  # noqa: E402
import main as ana_trainer  # noqa: E402
import train_pu_selective_fixmatch as cryoem_trainer  # noqa: E402
from utils.cryoem.config import default_config  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import exit_on_user_error  # noqa: E402
from utils.precision import make_precision  # noqa: E402

KEYS = {"cryoem": ("auc", "ap", "precision", "recall", "f1", "best_f1"),
        "ana": ("f1_mi", "f1_ma", "acc_total", "mAP")}
# main.py's full model (the README's command)
FULL_METHOD = ("--initWeight", "iw-sample", "--updateLR", "ulr-adaptive", "--granularity", "label",
               "--sampling", "--trainingLabel", "pseudo", "--lr", "1e-3", "--weight_lr", "1e-3")
ANA_CLASSES = 4


def build_parser():
    p = argparse.ArgumentParser(description="Each family's demo training with and without mixed precision, "
                                            "side by side.")
    p.add_argument("--family", choices=("both", "cryoem", "ana"), default="both",
                   help="which trainer(s) to run (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--data-dir", default="data/cryoem", help="CryoEM demo data (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="CryoEM training epochs per run (default: %(default)s)")
    p.add_argument("--ana-data-dir", default="data/ana_amp",
                   help=f"ANA data: a generated set of {ANA_CLASSES} classes, written when missing "
                        "(default: %(default)s)")
    p.add_argument("--ana-epochs", type=int, default=4, help="ANA training epochs per run (default: %(default)s)")
    p.add_argument("--ana-image-size", type=int, default=64,
                   help="ANA network input in px (default: %(default)s; ResNet-18)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of both trainers (default: 0)")
    p.add_argument("--seed", type=int, default=42, help="training seed of both runs (default: %(default)s)")
    return p


def _cpu_bf16(module, device):
    """On the CPU the trainers keep float32; make ``module``'s ``make_precision`` force bf16 autocast."""
    if device.type == "cpu":
        module.make_precision = lambda dev, enabled: make_precision(dev, enabled, allow_cpu=True)


def run_cryoem(args, device, tmp, amp):
    data = Path(args.data_dir)
    if not (data / "preprocessed_data.pt").exists() and not list(data.glob("chunk_*.pt")):
        generate_cryoem_demo(data)
    cfg = default_config()
    cfg["data"].update(data_dir=str(data), num_workers=args.num_workers)
    cfg["training"].update(epochs=args.epochs, seed=args.seed, device=str(device), amp=amp)
    result = cryoem_trainer.run(cfg, cryoem_trainer.RunSpec(run_dir=Path(tmp) / f"cryoem_amp_{amp}", resume=False,
                                                             command=None))
    return {**{k: result["test"][k] for k in KEYS["cryoem"]}, "best_epoch": result["best_epoch"]}


def run_ana(args, device, tmp, amp):
    data = Path(args.ana_data_dir)
    if not (data / "annotations.csv").is_file():
        generate_ana_demo(data, n_train=32, n_val=8, n_test=8, tiles_x=2, tiles_y=2, tile_size=128,
                          num_classes=ANA_CLASSES, max_labels=3, seed=1)
    argv = ["--annFile", str(data / "annotations.csv"), "--imageDir", str(data / "images"),
            "--numClasses", str(ANA_CLASSES), "--arch", "resnet18", "--imageSize", str(args.ana_image_size),
            "--tileSize", "128", "--no-pretrained", "--numWorkers", str(args.num_workers), "--epoch",
            str(args.ana_epochs), "--seed", str(args.seed), "--device", str(device), "--cacheDir",
            str(Path(tmp) / "cache"), "--pathModelParams", str(Path(tmp) / f"ana_amp_{amp}"),
            "--amp" if amp else "--no-amp", *FULL_METHOD]
    result = ana_trainer.run(ana_trainer.resolve_settings(build_main_parser().parse_args(argv), config))
    best = json.loads((Path(result["run_dir"]) / "results.json").read_text())[-1]["epoch"]
    return {**{k: result["test"][k] for k in KEYS["ana"]}, "best_epoch": best}


RUNS = {"cryoem": (cryoem_trainer, run_cryoem), "ana": (ana_trainer, run_ana)}


@exit_on_user_error
def main(argv=None):
    """Both precisions of each chosen family; returns ``{family: {"float32": metrics, "amp": metrics}}``."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    families = ("cryoem", "ana") if args.family == "both" else (args.family,)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            module, run = RUNS[family]
            original = module.make_precision
            out[family] = {}
            for amp in (False, True):
                if amp:
                    _cpu_bf16(module, device)
                try:
                    out[family]["amp" if amp else "float32"] = run(args, device, tmp, amp)
                finally:
                    module.make_precision = original
    for family, runs in out.items():
        print(f"\n{family}: {'test metric':<12} {'float32':>9} {'amp':>9} {'difference':>11}")
        for k in KEYS[family]:
            a, b = runs["float32"][k], runs["amp"][k]
            print(f"{family}: {k:<12} {a:>9.4f} {b:>9.4f} {b - a:>+11.4f}")
        print(f"{family}: {'best epoch':<12} {runs['float32']['best_epoch']:>9} {runs['amp']['best_epoch']:>9}")
    print(json.dumps({"device": str(device)}))
    return out


if __name__ == "__main__":
    main()
