"""PU learning + Selective FixMatch training of a cryo-EM particle classifier.

    python train_pu_selective_fixmatch.py --config configs/pu_selective_fixmatch.yaml \
        --exp-name my_experiment --data-dir /path/to/data --batch-size 32 --epochs 100

Settings come from the YAML config (utils/cryoem/config.py holds the defaults and checks);
the flags below override it. Outputs go to <output-dir>/<exp-name>/: config.yaml, train.log,
TensorBoard events, best_model.pt (EMA teacher with the best val AUC), last.pt (--resume)
and results.json (test metrics of the best model). See the README, "CryoEM PU + Selective FixMatch".
"""
import argparse
from pathlib import Path

from utils.checks import SEED_MAX, int_arg
from utils.cryoem.config import apply_cli_overrides, load_config
from utils.cryoem.train import run
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.interrupt import rerun_command

DEFAULT_CONFIG = "configs/pu_selective_fixmatch.yaml"


def prior_arg(text):
    """``auto`` or a number (argparse type of --prior; the range is checked with the config)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1) or auto, got {text!r}") from None


def build_parser():
    parser = ArgumentParser(
        description="Train a cryo-EM particle classifier from positive and unlabelled patches "
                    "(nnPU + Selective FixMatch with an EMA teacher). Values not given here come from --config.")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML config; its keys override the built-in defaults (default: %(default)s)")
    parser.add_argument("--exp-name", default=None,
                        help="run name: outputs go to <output-dir>/<exp-name>/ (default: the config file's stem)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with preprocessed_data.pt or chunk_*.pt (default: data.data_dir of the config)")
    parser.add_argument("--batch-size", type=int_arg(1), default=None,
                        help="patches per batch, mixed by data.batch_ratio (default: training.batch_size of the config)")
    parser.add_argument("--epochs", type=int_arg(1), default=None,
                        help="maximum number of epochs (default: training.epochs of the config)")
    parser.add_argument("--prior", type=prior_arg, default=None,
                        help="class prior pi of the nnPU risk, a number in (0, 1) or auto = the data's metadata.prior "
                             "(0.3, the documented default, with a warning when the data hold none) (default: "
                             "loss.prior of the config)")
    parser.add_argument("--output-dir", default="experiments",
                        help="parent folder of the run directories (default: %(default)s/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in <output-dir>/<exp-name>/ from its last.pt (default: off, "
                             "start a new run; an existing run directory is then an error)")
    parser.add_argument("--seed", type=int_arg(0, SEED_MAX), default=None,
                        help="random seed of split, sampler, augmentation and initialisation "
                             "(default: training.seed of the config)")
    parser.add_argument("--device", default=None,
                        help="auto, cpu, cuda or cuda:N (default: training.device of the config; auto = CUDA if available)")
    parser.add_argument("--num-workers", type=int_arg(0), default=None,
                        help="DataLoader worker processes, 0 = main process (default: data.num_workers of the config)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision on a GPU: bfloat16 where supported, else float16 with loss scaling "
                             "(default: training.amp of the config, true; no effect on the CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the student for training (default: training.compile of the config, false)")
    return parser


def resolve_config_path(path):
    """``path`` as given, or the repository's copy when the default is used from another directory."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute():
        beside = Path(__file__).resolve().parent / path
        if beside.is_file():
            return beside
    return path


@exit_on_user_error
def main(argv=None):
    """Parse ``argv`` (default: sys.argv), train, and return the results dict (results.json plus ``run_dir``)."""
    args = build_parser().parse_args(argv)
    config_path = resolve_config_path(args.config)
    cfg = apply_cli_overrides(load_config(config_path), args)
    exp_name = args.exp_name if args.exp_name is not None else config_path.stem
    if not exp_name or exp_name in (".", "..") or "/" in exp_name or "\\" in exp_name:
        raise UserError(f"--exp-name {exp_name!r} must be a plain folder name (no path separators)")
    return run(cfg, argparse.Namespace(exp_name=exp_name, output_dir=args.output_dir, resume=args.resume,
                                       command=rerun_command(__file__, argv, add=("--resume",))))


if __name__ == "__main__":
    main()
