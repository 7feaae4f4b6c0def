"""Generated micrographs with known particle centres, for the demo and the tests.

Each micrograph is Gaussian noise over a smooth background, with ``n_particles`` particles
(a dark disc of radius ``particle_radius`` with a brighter core, like a projected protein
in negative-contrast cryo-EM) at random positions at least one diameter apart, and
``n_decoys`` decoys (small elongated dark streaks, "carbon edges / ice" stand-ins) that a
picker must learn to reject. Files are written in a mix of formats (MRC, PNG, TIFF) so the
readers are exercised; coordinates go to ``coordinates.star`` (RELION) and
``coordinates.csv`` (micrograph,x,y), x = column, y = row of the array as stored.
:func:`synthetic_micrograph` returns one such micrograph and its centres in memory (the
speed benchmark, ``benchmarks/bench_cryoem.py``, picks on it).
"""
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
from PIL import Image

from datasets.micrographs import write_csv, write_star

FORMATS = (".mrc", ".png", ".tif")


def _place(rng, size, n, min_dist, margin):
    """Up to ``n`` points in ``[margin, size - margin)^2``, pairwise at least ``min_dist`` apart."""
    points = []
    for _ in range(n * 50):
        if len(points) == n:
            break
        p = rng.uniform(margin, size - margin, size=2)
        if all(np.hypot(*(p - q)) >= min_dist for q in points):
            points.append(p)
    return np.array(points).reshape(-1, 2)


def _reach(radius):
    """Half-side of the square around a particle or decoy outside which its terms are below 1e-15:
    the disc's edge term is exp(-40) at ``radius + 60`` px, a decoy's exp(-36) at ``9 * radius``."""
    return int(np.ceil(max(radius + 60, 9 * radius)))


def _render(rng, size, centres, decoys, radius, noise, local=False):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = 0.3 * np.sin(xx / size * 2.1 + rng.uniform(0, 6)) * np.cos(yy / size * 1.7 + rng.uniform(0, 6))
    h = _reach(radius)

    def box(x, y):  # the whole image, or (local) the square where the term is not negligible
        if not local:
            return slice(None), slice(None)
        return slice(max(0, int(y) - h), int(y) + h + 1), slice(max(0, int(x) - h), int(x) + h + 1)

    for x, y in centres:
        b = box(x, y)
        d = np.hypot(xx[b] - x, yy[b] - y)
        img[b] -= 1.0 / (1.0 + np.exp((d - radius) / 1.5))  # soft dark disc
        img[b] += 0.6 * np.exp(-(d / (0.4 * radius)) ** 2)  # brighter core
    for x, y in decoys:
        b = box(x, y)
        angle = rng.uniform(0, np.pi)
        u = (xx[b] - x) * np.cos(angle) + (yy[b] - y) * np.sin(angle)
        v = -(xx[b] - x) * np.sin(angle) + (yy[b] - y) * np.cos(angle)
        img[b] -= np.exp(-(u / (1.5 * radius)) ** 2 - (v / (0.25 * radius)) ** 2)
    return img + rng.normal(0, noise, size=img.shape).astype(np.float32)


def synthetic_micrograph(size=384, particle_radius=10, n_particles=30, n_decoys=10, noise=0.6, seed=0,
                         local=False):
    """One generated micrograph in memory: ``(image, centres)``.

    ``image`` is a float32 ``[size, size]`` array as written to the files (before any format's
    conversion), ``centres`` a float ``[n, 2]`` array of the particles' (x = column, y = row),
    whole pixels; ``n`` can be below ``n_particles`` when the micrograph has no room left.
    ``seed`` is an int or a ``numpy.random.Generator`` (drawn from, as
    :func:`generate_micrograph_demo` does for each of its micrographs). ``local=True`` draws
    each particle and decoy only within the square where it is above 1e-15 (see ``_reach``),
    which makes large micrographs many times faster to generate; the image differs from
    ``local=False`` by rounding only.
    """
    rng = np.random.default_rng(seed)
    pts = np.round(_place(rng, size, n_particles + n_decoys, 2.2 * particle_radius, particle_radius))
    centres, decoys = pts[:n_particles], pts[n_particles:]
    return _render(rng, size, centres, decoys, particle_radius, noise, local), centres


def generate_micrograph_demo(out_dir, n_micrographs=4, size=384, particle_radius=10, n_particles=30,
                             n_decoys=10, noise=0.6, seed=0):
    """Write the micrographs and coordinate files to ``out_dir``; return ``{"micrographs", "star", "csv"}``."""
    out_dir = Path(out_dir)
    (out_dir / "micrographs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, paths = [], []
    for i in range(n_micrographs):
        img, centres = synthetic_micrograph(size, particle_radius, n_particles, n_decoys, noise, rng)
        ext = FORMATS[i % len(FORMATS)]
        path = out_dir / "micrographs" / f"mic_{i:02d}{ext}"
        if ext == ".mrc":
            with mrcfile.new(path, overwrite=True) as mrc:
                mrc.set_data(img.astype(np.float32))
        elif ext == ".png":  # 8-bit, as many exported micrographs are
            lo, hi = np.percentile(img, [0.5, 99.5])
            Image.fromarray(np.clip((img - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)).save(path)
        else:
            Image.fromarray(img.astype(np.float32)).save(path)  # mode F: 32-bit float TIFF
        paths.append(path)
        rows += [(path.name, float(round(x)), float(round(y))) for x, y in centres]
    coords = pd.DataFrame(rows, columns=["micrograph", "x", "y"]).assign(score=np.nan)
    write_star(out_dir / "coordinates.star", coords)
    write_csv(out_dir / "coordinates.csv", coords)
    return {"micrographs": paths, "star": out_dir / "coordinates.star", "csv": out_dir / "coordinates.csv"}
