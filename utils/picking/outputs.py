"""The files ``pick_particles.py`` (and ``rethreshold_picks.py``) write, laid out for RELION and cryoSPARC.

Layout of an output folder ``OUT`` for micrographs given as ``MotionCorr/job002/Movies/m1.mrc``, ...:

* ``OUT/MotionCorr/job002/Movies/m1_autopick.star``: one STAR per micrograph (``_rlnCoordinateX``,
  ``_rlnCoordinateY``, ``_rlnAutopickFigureOfMerit``; an empty loop when nothing was picked) in a
  folder tree that mirrors the micrograph's path (:func:`mirror_folders`), as RELION's AutoPick;
* ``OUT/autopick.star``: the index RELION 4/5 reads (block ``coordinate_files``: ``_rlnMicrographName``
  = the micrograph path as given, ``_rlnMicrographCoordinates`` = ``OUT/.../m1_autopick.star``);
* ``OUT/picks.star`` (all picks, ``_rlnMicrographName`` = the path as given) and ``OUT/picks.csv``;
* ``OUT/box/<tree>/m1.box``: EMAN BOX files (lower-left corner + box size);
* ``OUT/candidates.star``: every candidate above the score floor with its score, the input of
  re-thresholding (the picks at a threshold ``t`` are exactly the candidates with score ``>= t``,
  because greedy NMS decides each candidate from higher-scored ones only);
* ``OUT/score_histogram.png`` (candidate scores, the threshold marked), ``OUT/overlays/<tree>/m1.png``
  on request, and ``OUT/picking.json`` (settings, threshold and its rule, per-micrograph sizes and
  counts, the list of files written).

Coordinates are in the micrographs' original pixels, x = column, y = row of the image as read,
unless ``invert_y``: then ``y' = H - 1 - y`` (``H`` = the micrograph's height), the frame of an MRC
whose image was exported flipped in y (JPG/PNG from some tools). Overlays are always drawn in the
image's own frame.

Everything of one run is written to a temporary folder inside ``OUT`` and moved into place at the
end (:class:`PickStaging`): a run that fails leaves the files of the previous run as they were; a
run that succeeds replaces them, and removes the previous run's files it does not rewrite.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import starfile

from datasets.micrographs import micrograph_key, read_micrograph, write_box, write_csv, write_star
from utils.figures import histogram_image, save_png
from utils.io import atomic_write, write_json
from utils.picking.picker import overlay_image
from utils.run import Staging

INDEX_NAME = "autopick.star"
CANDIDATES_NAME = "candidates.star"
SUMMARY_NAME = "picking.json"
STAGING_PREFIX = ".pick-"  # a run's temporary folder inside the output folder


@dataclass(frozen=True)
class MicrographEntry:
    """One picked micrograph: ``path`` as given, ``key`` (name without folder and suffix), ``folder``
    (its mirrored output folder, posix, ``.`` for the top), ``height`` and ``width`` in pixels."""
    path: str
    key: str
    folder: str
    height: int
    width: int

    def _in_folder(self, *parts):
        return str(PurePosixPath(self.folder, *parts)) if self.folder != "." else str(PurePosixPath(*parts))

    @property
    def star(self):
        return self._in_folder(f"{self.key}_autopick.star")

    @property
    def box(self):
        return str(PurePosixPath("box", self._in_folder(f"{self.key}.box")))

    @property
    def overlay(self):
        return str(PurePosixPath("overlays", self._in_folder(f"{self.key}.png")))


def mirror_folders(paths):
    """Each micrograph's output folder (posix, relative): its folder relative to the working
    directory when every micrograph lies inside it (a RELION project: run from the project
    directory), else relative to the deepest folder that holds them all."""
    absolute = [Path(os.path.abspath(p)) for p in paths]  # normalises '..' without following links
    cwd = Path(os.path.abspath(os.getcwd()))
    try:
        relative = [a.relative_to(cwd) for a in absolute]
    except ValueError:
        common = Path(os.path.commonpath([str(a.parent) for a in absolute]))
        relative = [a.relative_to(common) for a in absolute]
    return [r.parent.as_posix() for r in relative]


def micrograph_entries(paths, sizes):
    """:class:`MicrographEntry` per path; ``sizes`` maps each path to ``(H, W)``."""
    return [MicrographEntry(path=str(p), key=micrograph_key(Path(p).name), folder=folder,
                            height=int(sizes[p][0]), width=int(sizes[p][1]))
            for p, folder in zip(paths, mirror_folders(paths))]


def flip_y(picks, heights):
    """A copy of ``picks`` with ``y -> H - 1 - y``, ``H`` = ``heights[micrograph key]``: the row index
    of the same pixel after flipping the image upside down (its own inverse)."""
    out = picks.copy()
    h = out["micrograph"].map(lambda name: heights[micrograph_key(name)]).to_numpy(dtype=np.float64)
    out["y"] = h - 1 - out["y"].to_numpy(dtype=np.float64)
    return out


def text_histogram(scores, threshold, bins=10, width=40):
    """Lines of a text histogram of ``scores`` over [0, 1] with the bin holding ``threshold`` marked."""
    counts, edges = np.histogram(np.asarray(scores, dtype=np.float64), bins=bins, range=(0.0, 1.0))
    top = max(int(counts.max()), 1) if len(counts) else 1
    lines = []
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        mark = " <- threshold" if lo <= threshold < hi or (hi == 1.0 and threshold == 1.0) else ""
        lines.append(f"{lo:4.2f}-{hi:4.2f} {int(n):7d} {'#' * round(width * n / top)}{mark}")
    return lines


class PickStaging(Staging):
    """The :class:`utils.run.Staging` of a picking folder: ``.pick-*``; the files the previous run
    listed in its ``picking.json`` and did not rewrite are removed, and ``picking.json`` is installed
    last (until it is replaced, it describes the files of the previous run)."""
    prefix = STAGING_PREFIX
    last = SUMMARY_NAME

    def previous_files(self):
        return previous_files(self.out_dir)


def previous_files(out_dir):
    """The files an earlier run listed in ``out_dir/picking.json`` (empty when there is none)."""
    try:
        files = json.loads((Path(out_dir) / SUMMARY_NAME).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)]


def write_picks(staging, out_dir, candidates, threshold, entries, box_size, pixel_size=None):
    """Stage the coordinate files of the picks (``candidates`` with ``score >= threshold``).

    ``candidates``: micrograph (path as given), x, y, score, in the output frame. ``pixel_size``
    (Angstrom per pixel, when known) goes into the index as ``_rlnMicrographPixelSize`` and into
    ``picks.star`` as an optics block (:func:`datasets.micrographs.write_star`). Returns the picks
    and ``{key: number of picks}``.
    """
    picks = candidates[candidates["score"] >= threshold].reset_index(drop=True)
    by_name = dict(tuple(picks.groupby("micrograph", sort=False)))
    index, counts = [], {}
    for e in entries:
        mine = by_name.get(e.path, picks.iloc[:0])
        counts[e.key] = len(mine)
        block = pd.DataFrame({"rlnCoordinateX": mine["x"].to_numpy(dtype=np.float64),
                              "rlnCoordinateY": mine["y"].to_numpy(dtype=np.float64),
                              "rlnAutopickFigureOfMerit": mine["score"].to_numpy(dtype=np.float64)})
        text = starfile.to_string(block, float_format="%.6f")
        atomic_write(staging.path(e.star), lambda f, t=text: f.write(t), mode="w")
        write_box(staging.path(e.box), mine, box_size)
        index.append((e.path, str(PurePosixPath(Path(out_dir).as_posix(), e.star))))
    index = pd.DataFrame(index, columns=["rlnMicrographName", "rlnMicrographCoordinates"])
    if pixel_size is not None:
        index["rlnMicrographPixelSize"] = float(pixel_size)
    text = starfile.to_string({"coordinate_files": index}, float_format="%.6f")
    atomic_write(staging.path(INDEX_NAME), lambda f: f.write(text), mode="w")
    write_star(staging.path("picks.star"), picks, pixel_size=pixel_size)
    write_csv(staging.path("picks.csv"), picks)
    return picks, counts


def write_overlays(staging, entries, sources, candidates, threshold, radius, invert_y):
    """Stage ``overlays/<tree>/<name>.png`` for each entry, reading its micrograph from ``sources[key]``:
    picks (score >= ``threshold``) in green, other candidates in grey, in the image's own frame
    (``candidates`` are in the output frame, flipped back when ``invert_y``)."""
    image_frame = flip_y(candidates, {e.key: e.height for e in entries}) if invert_y else candidates
    for e in entries:
        mine = image_frame[image_frame["micrograph"] == e.path]
        save_png(staging.path(e.overlay), overlay_image(read_micrograph(sources[e.key]), mine, radius,
                                                        threshold=threshold))


def write_summary_files(staging, candidates, threshold, summary):
    """Stage ``candidates.star``, ``score_histogram.png`` and ``picking.json`` (``summary`` plus the
    list of every staged file, this one included)."""
    write_star(staging.path(CANDIDATES_NAME), candidates)
    save_png(staging.path("score_histogram.png"),
             histogram_image(candidates["score"].to_numpy(dtype=np.float64), threshold,
                             title=f"{len(candidates)} candidates, threshold {threshold:.3g}"))
    files = sorted(set(staging.files()) | {SUMMARY_NAME})
    write_json(staging.path(SUMMARY_NAME), {**summary, "files": files})


def entries_from_summary(summary):
    """The :class:`MicrographEntry` list stored in a ``picking.json`` dict."""
    return [MicrographEntry(**{k: m[k] for k in asdict(MicrographEntry("", "", ".", 0, 0))})
            for m in summary["micrographs"].values()]
