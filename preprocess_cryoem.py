"""Micrographs + particle coordinates -> training files for train_pu_selective_fixmatch.py.

    python preprocess_cryoem.py --micrographs data/micrographs --coordinates particles.star \
        --particle-radius 54 --downsample 2 --patch-size 64 --stride 32 \
        --test-micrographs mic_03 mic_04 --output-dir data/my_cryoem

The particle size may be given in Angstrom instead (--particle-diameter-A 150): the pixel size
comes from the MRC headers, the STAR optics block or --pixel-size.

Micrographs: MRC, TIFF, PNG or JPG (files, folders or glob patterns). Coordinates: a RELION
STAR, EMAN BOX (or a folder of them, one per micrograph) or CSV/TSV file with x/y columns;
the log says which columns were used. Writes preprocessed_data.pt (or chunk_*.pt), val.pt /
test.pt from held-out micrographs, labelled_positives.csv and preprocess.json; the prior
estimate goes into the metadata, where ``loss.prior: auto`` finds it. See
datasets/cryoem_preprocess.py for the frames and the definitions.
"""
from datasets.cryoem_preprocess import DTYPES, NORMALIZATIONS, PreprocessOptions, run_preprocess
from utils.checks import SEED_MAX, float_arg, int_arg
from utils.errors import ArgumentParser, exit_on_user_error
from utils.logger import close_run_logger, setup_run_logger


def build_parser():
    p = ArgumentParser(description="Cut PU training patches (and labelled val/test patches) out of "
                                            "micrographs with particle coordinates. Distances are in the "
                                            "original micrographs' pixels unless said otherwise.")
    p.add_argument("--micrographs", nargs="+", required=True,
                   help="micrograph files, folders or glob patterns (.mrc .tif .tiff .png .jpg)")
    p.add_argument("--coordinates", required=True,
                   help="particle centres: a STAR, BOX or CSV/TSV file, or a folder of per-micrograph files")
    p.add_argument("--output-dir", required=True, help="folder for the training files (the --data-dir of training)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--particle-radius", type=float_arg(0, low_open=True), default=None,
                      help="particle radius in px; val/test negatives lie farther than this from every particle")
    size.add_argument("--particle-diameter-A", type=float_arg(0, low_open=True), default=None,
                      help="or: the particle diameter in Angstrom; radius = diameter / 2 / pixel size")
    p.add_argument("--pixel-size", type=float_arg(0, low_open=True), default=None,
                   help="Angstrom per pixel of the micrographs (default: the MRC headers, else the optics block "
                        "of a STAR --coordinates file; JPG/PNG/TIFF carry none); micrographs of different pixel "
                        "sizes in one run are an error")
    p.add_argument("--patch-size", type=int_arg(8), default=128,
                   help="side of the classified window in px of the downsampled micrograph, a multiple of 32 for "
                        "dense picking (default: %(default)s)")
    p.add_argument("--context", type=int_arg(0), default=64,
                   help="px of surroundings stored around each patch, a multiple of 32; the classifier pools "
                        "only the central window's features, so picking over whole micrographs matches it: "
                        "64 (two cells of the trunk's last feature map) makes the dense map equal the crop "
                        "classifier's within ~0.01, 32 leaves differences up to ~0.6 (default: %(default)s; "
                        "0 = bare patches)")
    p.add_argument("--stride", type=int_arg(1), default=64,
                   help="step of the unlabelled sliding window, px of the downsampled micrograph (default: %(default)s)")
    p.add_argument("--downsample", type=float_arg(1), default=1.0,
                   help="downsampling factor by area averaging, >= 1 (default: %(default)s = none)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--labelled-fraction", type=float_arg(0, 1, low_open=True), default=1.0,
                       help="fraction of each training micrograph's annotated particles kept as labelled "
                            "positives, at least 1; the rest stay unlabelled (default: %(default)s = every "
                            "particle you picked; a benchmark that hides labels passes e.g. 0.1)")
    group.add_argument("--labelled-count", type=int_arg(1), default=None,
                       help="or: this many labelled particles per training micrograph")
    p.add_argument("--val-micrographs", nargs="+", default=[], metavar="NAME",
                   help="micrographs held out for the labelled val set (default: none: training holds out "
                        "a fraction of its P and U patches instead)")
    p.add_argument("--test-micrographs", nargs="+", default=[], metavar="NAME",
                   help="micrographs held out for the labelled test set (default: none)")
    p.add_argument("--positive-radius", type=float_arg(0, low_open=True), default=None,
                   help="a window centred within this distance of a particle counts as positive for the prior "
                        "estimate (default: half the particle radius)")
    p.add_argument("--expected-particles", type=float_arg(0, low_open=True), default=None,
                   help="particles per micrograph, for the prior when the coordinates are incomplete "
                        "(default: count the annotated particles)")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="zscore",
                   help="per-micrograph normalisation after downsampling (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16",
                   help="storage type of the patches (default: %(default)s)")
    p.add_argument("--chunk-size", type=int_arg(1), default=20000,
                   help="patches per chunk_NNN.pt file; one file only is written as preprocessed_data.pt "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int_arg(0, SEED_MAX), default=0,
                   help="seed of the labelled subset (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier preprocessing in --output-dir (default: refuse)")
    return p


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    opts = PreprocessOptions(
        particle_radius=args.particle_radius, patch_size=args.patch_size, context=args.context, stride=args.stride,
        downsample=args.downsample, labelled_fraction=args.labelled_fraction, labelled_count=args.labelled_count,
        val_micrographs=tuple(args.val_micrographs), test_micrographs=tuple(args.test_micrographs),
        positive_radius=args.positive_radius, expected_particles=args.expected_particles,
        normalization=args.normalize, seed=args.seed, chunk_size=args.chunk_size, dtype=args.dtype,
        particle_diameter_A=args.particle_diameter_A, pixel_size=args.pixel_size)
    logger = setup_run_logger("preprocess_cryoem", None)
    try:
        return run_preprocess(args.micrographs, args.coordinates, args.output_dir, opts, logger,
                              overwrite=args.overwrite)
    finally:
        close_run_logger(logger)


if __name__ == "__main__":
    main()
