"""Self-paced multi-instance multi-label training on ANA immunofluorescence images.

    python main.py --saveModel --lr 1e-3 --weight_lr 1e-3 --initWeight iw-sample \
        --updateLR ulr-adaptive --granularity label --sampling --trainingLabel pseudo

Defaults come from config.py; every flag overrides them. See README.md.
"""
import config
from utils.ana.train import add_arguments, run
from utils.errors import ArgumentParser, exit_on_user_error
from utils.interrupt import rerun_command


def build_parser():
    parser = ArgumentParser(
        description="Self-paced MIML training for ANA images (multi-label). Defaults from config.py.")
    return add_arguments(parser, config)


@exit_on_user_error
def main(argv=None):
    """Parse ``argv`` (default: sys.argv), train, and return the final metrics dict."""
    args = build_parser().parse_args(argv)
    return run(args, config, command=rerun_command(__file__, argv, add=("--loadModel",)))


if __name__ == "__main__":
    main()
