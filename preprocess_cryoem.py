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

The run (:func:`run_preprocess`) holds --output-dir for its whole length (utils/run.py,
:func:`~utils.run.run_frame`): everything is written to a temporary folder inside it first and
moved into place at the end, so an error (bad input found late) or Ctrl-C leaves an earlier
preprocessing untouched.
"""
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from datasets.cryoem_preprocess import (DATA_FILES, DTYPES, NORMALIZATIONS, ChunkWriter, PreprocessOptions,
                                        class_prior, crops_at, data_metadata, existing_data, labelled_subset,
                                        micrograph_roles, prepare_micrograph, resolve_particle_radius, to_downsampled,
                                        window_geometry)
from datasets.cryoem_preprocess import logger as data_logger
from datasets.micrographs import (check_coordinates, drop_duplicate_coordinates, list_micrographs, micrograph_key,
                                  micrograph_shape, read_coordinates, read_micrograph, write_csv)
from utils.checkpoint import save_checkpoint
from utils.checks import SEED_MAX, float_arg, int_arg
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.io import to_json_safe, write_json
from utils.logger import close_run_logger, setup_run_logger
from utils.run import Staging, claim_run_dir, run_frame


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
        return run_preprocess(args.micrographs, args.coordinates, args.output_dir, opts, logger=logger,
                              overwrite=args.overwrite)
    finally:
        close_run_logger(logger)


class PreprocessStaging(Staging):
    """The :class:`utils.run.Staging` of a preprocessing: ``.preprocess-*``; installing replaces
    the data files of the previous preprocessing (``chunk_*.pt`` and ``DATA_FILES``), removing
    those this run does not write."""
    prefix = ".preprocess-"

    def previous_files(self):
        return [p.name for p in self.out_dir.glob("chunk_*.pt")] + list(DATA_FILES)

    def log_removed(self, logger):
        for name in self.removed:
            logger.info("removed %s, left by an interrupted preprocessing", self.out_dir / name)


def run_preprocess(micrograph_inputs, coordinates_path, out_dir, opts, *, logger=None, overwrite=False):
    """Write the training files for ``micrograph_inputs`` + ``coordinates_path`` into ``out_dir``
    (datasets/cryoem_preprocess.py says what they hold); ``opts``: a
    :class:`~datasets.cryoem_preprocess.PreprocessOptions`.

    Returns the summary that is also written to ``preprocess.json``. Everything is written to
    a temporary folder inside ``out_dir`` first and moved into place at the end
    (:class:`PreprocessStaging`), so an error (bad input found late) leaves an earlier
    preprocessing untouched.
    """
    log = logger or data_logger
    paths = list_micrographs(micrograph_inputs)
    opts, pixel_size = resolve_particle_radius(opts, paths, coordinates_path, log)
    opts.check()
    out_dir = Path(out_dir)
    lock = claim_run_dir(out_dir, "--output-dir", hint="or choose another --output-dir")
    if existing_data(out_dir) and not overwrite:
        raise UserError(f"{out_dir} already holds preprocessed data ({', '.join(existing_data(out_dir)[:3])}); "
                        f"pass --overwrite to replace it or choose another --output-dir")
    roles = micrograph_roles(paths, opts)
    coords, info = read_coordinates(coordinates_path)
    log.info(info)

    # headers only: the micrograph sizes fix the frames, the windows and the prior before any
    # pixel is decoded (an unreadable file found later still leaves out_dir untouched)
    sizes = {micrograph_key(p.name): micrograph_shape(p) for p in paths}
    coords = drop_duplicate_coordinates(check_coordinates(coords, sizes, str(coordinates_path), log),
                                        str(coordinates_path), log)
    by_key = {k: g[["x", "y"]].to_numpy(np.float64) for k, g in coords.groupby("key", sort=False)}
    full = opts.patch_size + 2 * opts.context  # stored patch: the window and its context on every side
    geometry = window_geometry(paths, sizes, by_key, opts)
    prior = class_prior(opts, [geometry[k] for k in geometry if roles[k] == "train"],
                        [sizes[k] for k in sizes if roles[k] == "train"])
    metadata = data_metadata(opts, prior, pixel_size, coordinates_path, paths, roles)

    rng = np.random.default_rng(opts.seed)
    dtype = DTYPES[opts.dtype]
    staging = PreprocessStaging(out_dir)
    with run_frame(out_dir, lock, None, logger=log, staging=staging):
        tmp = staging.tmp
        writer = ChunkWriter(tmp, opts.chunk_size, dtype, metadata)
        held = {"val": {"patches": [], "labels": []}, "test": {"patches": [], "labels": []}}
        per_mic, labelled_rows = {}, []
        for path in paths:
            key = micrograph_key(path.name)
            h, w, scale, centres, dist = geometry[key]
            image, _ = prepare_micrograph(read_micrograph(path), opts.downsample, opts.normalization)
            if tuple(image.shape) != (h, w):
                raise UserError(f"{path}: decoded as {image.shape[1]}x{image.shape[0]} px after downsampling, but its "
                                f"header says {w}x{h}")
            xy = by_key.get(key, np.zeros((0, 2)))
            particle_rc = np.rint(to_downsampled(xy, scale)[:, ::-1]).astype(np.int64)
            role = roles[key]
            stats = {"role": role, "size": [int(sizes[key][1]), int(sizes[key][0])], "n_annotated": len(xy)}
            if role == "train":
                keep = labelled_subset(len(xy), opts, rng)
                writer.add(crops_at(image, particle_rc[keep], full), crops_at(image, centres, full))
                for x, y in xy[keep]:
                    labelled_rows.append((path.name, float(x), float(y)))
                stats.update(n_labelled=len(keep), n_unlabeled=len(centres))
                if len(xy) == 0:
                    log.warning("%s: no annotated particle in %s: it gives unlabelled patches only",
                                path, coordinates_path)
            else:
                neg = centres[dist > opts.particle_radius]
                patches = torch.cat([crops_at(image, particle_rc, full), crops_at(image, neg, full)])
                held[role]["patches"].append(patches.to("cpu", dtype))
                held[role]["labels"].append(torch.cat([torch.ones(len(particle_rc)), torch.zeros(len(neg))]))
                stats.update(n_positive=len(particle_rc), n_negative=len(neg))
                if len(xy) == 0:
                    log.warning("%s is held out for %s but has no annotated particle in %s: all its patches are "
                                "labelled 0", path, role, coordinates_path)
            per_mic[path.name] = stats
            log.info("%s (%s): %s", path.name, role, ", ".join(f"{k} {v}" for k, v in stats.items() if k != "role"))
            del image

        if writer.n_pos == 0:
            raise UserError(f"no labelled positive: no annotated particle of {coordinates_path} lies on a training "
                            f"micrograph")
        files = writer.finish()
        for role, parts in held.items():
            if parts["patches"]:
                save_checkpoint({"patches": torch.cat(parts["patches"]), "labels": torch.cat(parts["labels"])},
                                tmp / f"{role}.pt")
        write_csv(tmp / "labelled_positives.csv",
                  pd.DataFrame(labelled_rows, columns=["micrograph", "x", "y"]).assign(score=np.nan))
        summary = {"metadata": metadata, "micrographs": per_mic,
                   "n_positive": writer.n_pos, "n_unlabeled": writer.n_unl,
                   "files": [p.name for p in files] + [f"{r}.pt" for r in held if held[r]["patches"]],
                   "options": to_json_safe(asdict(opts))}
        write_json(tmp / "preprocess.json", summary)
        staging.install()
    log.info("wrote %s to %s: %d labelled positives, %d unlabelled patches, prior %.4f (%s)",
             ", ".join(summary["files"]), out_dir, writer.n_pos, writer.n_unl, prior, metadata["prior_method"])
    return summary


if __name__ == "__main__":
    main()
