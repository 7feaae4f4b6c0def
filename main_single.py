"""Self-paced training on single-label ANA images (the reference code's README's third command).

    python main_single.py --saveModel --lr 1e-3

Same method, flags, outputs and resume as main.py, whose functions it runs; defaults come from
config_single.py, which keeps only images with exactly one label and sets the reference
main_single.py's specifics (pseudo-label targets, sampler refreshed every second epoch). Adds
top-1 accuracy and a confusion matrix (confusion_matrix.csv, TensorBoard).
"""
import config_single
import main as ana
from utils.errors import exit_on_user_error
from utils.interrupt import rerun_command

DESCRIPTION = "Self-paced training for single-label ANA images. Defaults from config_single.py."


def build_parser():
    return ana.build_parser(config_single, DESCRIPTION)


@exit_on_user_error
def main(argv=None):
    """Parse ``argv`` (default: sys.argv), train, and return the final metrics dict."""
    args = build_parser().parse_args(argv)
    return ana.run(ana.resolve_settings(args, config_single),
                   command=rerun_command(__file__, argv, add=("--loadModel",)))


if __name__ == "__main__":
    main()
