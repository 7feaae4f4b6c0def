"""Do results with and without mixed precision agree? CryoEM demo training twice, one table.

    python benchmarks/amp_agreement.py                 # CPU: bf16 autocast forced on
    python benchmarks/amp_agreement.py --device cuda   # GPU: the trainer's own AMP choice

Runs ``train_pu_selective_fixmatch.py``'s training (``utils.cryoem.train.run``) on the CryoEM
demo data (``make_demo_data.py --family cryoem``, written to ``--data-dir`` when missing) with
``training.amp`` false and true, same seed, and prints the test metrics of both and their
differences. On a GPU the trainer picks bf16 (or fp16 with loss scaling) itself. On the CPU the
trainer never uses AMP, so this script turns on bfloat16 autocast there (the numeric format a
bf16 GPU uses; the kernels differ) to exercise the same code path.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.synthetic_cryoem import generate_cryoem_demo  # noqa: E402
from utils.cryoem import train as cryoem_trainer  # noqa: E402
from utils.cryoem.config import default_config  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import exit_on_user_error  # noqa: E402
from utils.precision import make_precision  # noqa: E402

KEYS = ("auc", "ap", "precision", "recall", "f1", "best_f1")


def build_parser():
    p = argparse.ArgumentParser(description="CryoEM demo training with and without mixed precision, side by side.")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--data-dir", default="data/cryoem", help="CryoEM demo data (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs per run (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="training seed of both runs (default: %(default)s)")
    return p


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    data = Path(args.data_dir)
    if not (data / "preprocessed_data.pt").exists() and not list(data.glob("chunk_*.pt")):
        generate_cryoem_demo(data)
    out = {}
    original = cryoem_trainer.make_precision
    with tempfile.TemporaryDirectory() as tmp:
        for amp in (False, True):
            cfg = default_config()
            cfg["data"].update(data_dir=str(data), num_workers=0)
            cfg["training"].update(epochs=args.epochs, seed=args.seed, device=str(device), amp=amp)
            if device.type == "cpu":  # the trainer keeps the CPU in float32; force bf16 autocast here
                cryoem_trainer.make_precision = lambda dev, enabled: make_precision(dev, enabled, allow_cpu=True)
            try:
                result = cryoem_trainer.run(cfg, SimpleNamespace(output_dir=tmp, exp_name=f"amp_{amp}",
                                                                 resume=False))
            finally:
                cryoem_trainer.make_precision = original
            out["amp" if amp else "float32"] = {k: result["test"][k] for k in KEYS}
            out["amp" if amp else "float32"]["best_epoch"] = result["best_epoch"]
    print(f"\n{'test metric':<12} {'float32':>9} {'amp':>9} {'difference':>11}")
    for k in KEYS:
        a, b = out["float32"][k], out["amp"][k]
        print(f"{k:<12} {a:>9.4f} {b:>9.4f} {b - a:>+11.4f}")
    print(f"{'best epoch':<12} {out['float32']['best_epoch']:>9} {out['amp']['best_epoch']:>9}")
    print(json.dumps({"device": str(device)}))
    return out


if __name__ == "__main__":
    main()
