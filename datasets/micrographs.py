"""Micrograph images and particle-coordinate files: reading, writing, matching.

Conventions used everywhere in this module (and by every caller):

* Pixel frame: ``x`` = column index, ``y`` = row index (0-based) of the 2-D array *as read*
  (Pillow's top-left origin; mrcfile's ``data[row, col]``). Nothing is ever flipped.
  Coordinates are particle *centres*, as floats.
* A coordinates table is a ``pandas.DataFrame`` with exactly the columns
  ``["micrograph", "x", "y", "score"]``: ``micrograph`` is the name as found in the file
  (``"Falcon_x.jpg"``, ``"Falcon_x"`` or a path), ``x`` / ``y`` / ``score`` are float64 and
  ``score`` is NaN when the file has none.
* Names are matched through :func:`micrograph_key` (basename minus a micrograph suffix), so
  ``"MotionCorr/job002/Falcon_x.mrc"``, ``"Falcon_x.jpg"`` and ``"Falcon_x"`` all match.
* Bad user input raises :class:`utils.errors.UserError` with one line naming the file, the
  column or value, and what was expected. Written files appear atomically (temp + replace).
"""
from __future__ import annotations

import contextlib
import glob
import io
import logging
import math
import warnings
from pathlib import Path, PurePosixPath

import mrcfile
import numpy as np
import pandas as pd
import starfile
from PIL import Image
from scipy.spatial import cKDTree

from utils.checks import not_a_file
from utils.errors import UserError
from utils.io import atomic_write

logger = logging.getLogger(__name__)

MICROGRAPH_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".png", ".jpg", ".jpeg")
COORDINATE_SUFFIXES = (".star", ".box", ".csv", ".tsv", ".txt")

# Accepted header names of table files (matched case-insensitively; the first present wins).
X_NAMES = ("x", "x_coord", "xcoord", "rlnCoordinateX", "_rlnCoordinateX", "coordinate_x", "center_x",
           "x_center")
Y_NAMES = ("y", "y_coord", "ycoord", "rlnCoordinateY", "_rlnCoordinateY", "coordinate_y", "center_y",
           "y_center")
MICROGRAPH_NAMES = ("micrograph", "micrograph_name", "image_name", "image", "rlnMicrographName",
                    "_rlnMicrographName", "mic", "filename", "file")
SCORE_NAMES = ("score", "rlnAutopickFigureOfMerit", "_rlnAutopickFigureOfMerit", "confidence",
               "probability", "fom")

# ITU-R BT.601 luma weights, as Pillow's convert("L") uses, but kept in float (no rounding).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_GRAY_MODES = ("L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _one_line(exc):
    """``Type: message`` of a library exception, squeezed onto one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# ----------------------------------------------------------------------------- names
def micrograph_key(name):
    """The name used to match micrographs: basename minus a known micrograph suffix.

    ``micrograph_key("a/b/Falcon_x.jpg") == "Falcon_x"``; the suffix test is case-insensitive
    and only :data:`MICROGRAPH_SUFFIXES` are removed, so ``"x.box"`` stays ``"x.box"`` and
    ``"Falcon_x"`` stays ``"Falcon_x"``.
    """
    base = PurePosixPath(str(name).strip()).name
    stem, dot, suffix = base.rpartition(".")
    if dot and stem and f".{suffix.lower()}" in MICROGRAPH_SUFFIXES:
        return stem
    return base


def list_micrographs(inputs):
    """Micrograph files from ``inputs``: files, directories or glob patterns, in that order.

    A directory gives its files with a :data:`MICROGRAPH_SUFFIXES` suffix, sorted by name; a
    pattern (``*``, ``?`` or ``[``; ``**`` recurses) gives its matching micrograph files,
    sorted. Raises UserError when an input does not exist or yields nothing, when a file
    has another suffix or is not a regular file (a named pipe would make the read wait forever),
    or when two files have the same :func:`micrograph_key` (names would be ambiguous when
    matching coordinates).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise UserError("no micrograph inputs given; expected files, directories or glob patterns")
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted((p for p in path.iterdir() if _is_micrograph(p) and not p.is_dir()), key=lambda p: p.name)
            if not files:
                raise UserError(f"{path}: directory has no micrograph files; expected names ending in "
                                f"{', '.join(MICROGRAPH_SUFFIXES)}")
        elif path.is_file():
            if not _is_micrograph(path):
                raise UserError(f"{path}: unknown micrograph suffix '{path.suffix}'; expected one of "
                                f"{', '.join(MICROGRAPH_SUFFIXES)}")
            files = [path]
        elif any(c in str(item) for c in "*?["):
            files = [Path(p) for p in sorted(glob.glob(str(item), recursive=True))
                     if _is_micrograph(Path(p)) and not Path(p).is_dir()]
            if not files:
                raise UserError(f"{item}: pattern matches no micrograph files; expected names ending in "
                                f"{', '.join(MICROGRAPH_SUFFIXES)}")
        else:
            raise UserError(f"{path}: micrograph file or directory {not_a_file(path)}")
        for file in files:  # a named pipe would make the read wait forever
            problem = not_a_file(file)
            if problem:
                raise UserError(f"{file}: micrograph {problem}; expected a micrograph file")
        found.extend(files)
    seen = {}
    for path in found:
        key = micrograph_key(path.name)
        if key in seen:
            raise UserError(f"{path}: micrograph name '{key}' is also given by {seen[key]}; "
                            f"expected one file per micrograph")
        seen[key] = path
    return found


def _is_micrograph(path):
    return path.suffix.lower() in MICROGRAPH_SUFFIXES


# ----------------------------------------------------------------------------- images
@contextlib.contextmanager
def _library_warnings():
    """Keep mrcfile's and Pillow's warnings off the terminal while a micrograph is read; yields the
    list they are recorded in. mrcfile warns in permissive mode about headers that other programs
    write (no map ID, an unknown machine stamp), Pillow about large images: the pixels are then
    checked here (shape, finite values, contrast), and an error says itself what is wrong in one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _first(caught):
    return f"; mrcfile: {caught[0].message}" if caught else ""


def read_micrograph(path):
    """One micrograph as a float32 array ``[H, W]`` (row ``y``, column ``x``), values as stored.

    MRC (``.mrc`` / ``.mrcs``) is read with mrcfile; a single section ``[1, H, W]`` is
    squeezed, a stack or volume of more sections is an error. TIFF / PNG / JPG are read with
    Pillow: grey modes (``L``, ``I;16``, ``I``, ``F``) keep their values; colour images become
    luminance ``0.299 R + 0.587 G + 0.114 B`` (alpha ignored); multi-page TIFFs are an error.
    No flip, no normalisation. Missing, corrupt or unknown-suffix files raise UserError, and so
    do images that cannot hold particles: a NaN or infinite pixel (normalisation would turn the
    whole micrograph into NaN) and a constant image (no contrast, nothing to pick).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: micrograph file {not_a_file(path)}")
    suffix = path.suffix.lower()
    if suffix in (".mrc", ".mrcs"):
        image = _read_mrc(path)
    elif suffix in MICROGRAPH_SUFFIXES:
        image = _read_pillow(path)
    else:
        raise UserError(f"{path}: unknown micrograph suffix '{path.suffix}'; expected one of "
                        f"{', '.join(MICROGRAPH_SUFFIXES)}")
    if image.ndim != 2 or image.size == 0:
        raise UserError(f"{path}: image has shape {tuple(image.shape)}; expected a non-empty 2-D image")
    bad = ~np.isfinite(image)
    if bad.any():
        y, x = np.argwhere(bad)[0]
        raise UserError(f"{path}: {int(bad.sum())} pixel(s) are NaN or infinite (the first at x={x}, y={y}); "
                        f"expected finite values (a micrograph with missing pixels cannot be normalised)")
    if image.min() == image.max():
        raise UserError(f"{path}: every pixel is {image.flat[0]:g} (a blank image); expected a micrograph with "
                        f"contrast, which particles give")
    return image


def micrograph_shape(path):
    """``(H, W)`` of a micrograph from its header, without decoding the pixels (same checks and
    errors as :func:`read_micrograph` where the header shows them)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: micrograph file {not_a_file(path)}")
    suffix = path.suffix.lower()
    if suffix not in MICROGRAPH_SUFFIXES:
        raise UserError(f"{path}: unknown micrograph suffix '{path.suffix}'; expected one of "
                        f"{', '.join(MICROGRAPH_SUFFIXES)}")
    try:
        if suffix in (".mrc", ".mrcs"):
            with _library_warnings() as notes, mrcfile.mmap(path, mode="r", permissive=True) as mrc:
                if mrc.data is None:
                    raise ValueError("no readable data (header invalid)" + _first(notes))
                shape = mrc.data.shape
                if len(shape) == 3 and shape[0] > 1:
                    raise UserError(f"{path}: MRC holds {shape[0]} sections {tuple(shape)}; "
                                    f"expected one micrograph [H, W] or [1, H, W]")
                shape = shape[-2:]
        else:
            with _library_warnings(), Image.open(path) as img:
                pages = getattr(img, "n_frames", 1)
                if pages > 1:
                    raise UserError(f"{path}: image has {pages} pages; expected a single-page image")
                shape = (img.height, img.width)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: cannot be read as a micrograph ({_one_line(exc)})") from None
    if len(shape) != 2 or 0 in shape:
        raise UserError(f"{path}: image has shape {tuple(shape)}; expected a non-empty 2-D image")
    return int(shape[0]), int(shape[1])


def _read_mrc(path):
    try:
        # mmap: a stack is refused from its header without reading all its sections.
        with _library_warnings() as notes, mrcfile.mmap(path, mode="r", permissive=True) as mrc:
            data = mrc.data
            if data is None:
                raise ValueError("no readable data (header invalid)" + _first(notes))
            if np.iscomplexobj(data):
                raise UserError(f"{path}: MRC holds complex values (mode {int(mrc.header.mode)}); "
                                f"expected a real-valued image")
            if data.ndim == 3 and data.shape[0] > 1:
                raise UserError(f"{path}: MRC holds {data.shape[0]} sections {tuple(data.shape)}; "
                                f"expected one micrograph [H, W] or [1, H, W]")
            image = np.array(data.reshape(data.shape[-2:]) if data.ndim == 3 else data, dtype=np.float32)
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign file: say which one
        raise UserError(f"{path}: cannot be read as MRC ({_one_line(exc)})") from None
    return image


def _read_pillow(path):
    try:
        with _library_warnings(), Image.open(path) as img:
            pages = getattr(img, "n_frames", 1)
            if pages > 1:
                raise UserError(f"{path}: image has {pages} pages; expected a single-page image")
            img.load()
            if img.mode in _GRAY_MODES:
                image = np.asarray(img).astype(np.float32)
            elif img.mode in ("LA", "La"):
                image = np.asarray(img.getchannel(0)).astype(np.float32)
            else:  # RGB, RGBA, P, CMYK, ...: luminance of the RGB rendering
                image = np.asarray(img.convert("RGB"), dtype=np.float32) @ _LUMA
    except UserError:
        raise
    except Exception as exc:  # unidentified, truncated, or a mode Pillow cannot convert
        raise UserError(f"{path}: cannot be read as an image ({_one_line(exc)})") from None
    return image


# ----------------------------------------------------------------------------- pixel size
# Two pixel sizes closer than this (relative) are the same (headers round them differently).
PIXEL_SIZE_TOLERANCE = 0.005


def micrograph_pixel_size(path):
    """The pixel size in Angstrom per pixel from an MRC header (mrcfile's ``voxel_size.x``), or None for
    other formats and for a header that holds none (0, what many tools write when they do not know)."""
    path = Path(path)
    if path.suffix.lower() not in (".mrc", ".mrcs"):
        return None
    try:
        with _library_warnings(), mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
            size = float(mrc.voxel_size.x)
    except Exception as exc:
        raise UserError(f"{path}: cannot be read as MRC ({_one_line(exc)})") from None
    return size if math.isfinite(size) and size > 0 else None


def star_pixel_size(path):
    """The pixel size (Angstrom per pixel) a STAR file's optics block gives its micrographs:
    ``rlnMicrographPixelSize``, else ``rlnImagePixelSize`` (RELION 3.1+), or None when it has neither.
    Optics groups with different sizes are a :class:`UserError` (one pixel size per run)."""
    path = Path(path)
    if path.suffix.lower() != ".star" or not path.is_file():
        return None
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot be parsed as STAR ({_one_line(exc)})") from None
    for column in ("rlnMicrographPixelSize", "rlnImagePixelSize"):
        for name, block in blocks.items():
            if isinstance(block, dict):
                block = pd.DataFrame({k: [v] for k, v in block.items()})
            if column not in getattr(block, "columns", ()):
                continue
            values = _numbers(path, f"{column} (block data_{name})", block[column])
            if (values <= 0).any():
                raise UserError(f"{path}: {column} (block data_{name}) is {values[values <= 0][0]:g}; expected a "
                                f"positive pixel size in Angstrom")
            if values.max() > values.min() * (1 + PIXEL_SIZE_TOLERANCE):
                raise UserError(f"{path}: {column} (block data_{name}) holds different pixel sizes "
                                f"({values.min():g} and {values.max():g} A/px); expected one pixel size per run: "
                                f"process each optics group separately")
            return float(values[0])
    return None


def resolve_pixel_size(paths, given=None, star=None, log=None):
    """``(Angstrom per pixel or None, where it came from)`` for the micrographs ``paths``.

    ``given`` (``--pixel-size``) wins (a warning when an MRC header says otherwise); else the MRC
    headers (:func:`micrograph_pixel_size`), which must agree; else the optics block of the STAR file
    ``star`` (:func:`star_pixel_size`); else None (JPG/PNG/TIFF carry none). Micrographs of different
    pixel sizes in one run are a :class:`UserError`: the network's input scale must be the same for
    all, so process them in separate runs (or rescale them to one pixel size first).
    """
    log = log if log is not None else logger
    headers = {str(p): micrograph_pixel_size(p) for p in paths}
    known = {p: v for p, v in headers.items() if v is not None}
    if known:
        (p_lo, lo), (p_hi, hi) = min(known.items(), key=lambda kv: kv[1]), max(known.items(), key=lambda kv: kv[1])
        if hi > lo * (1 + PIXEL_SIZE_TOLERANCE):
            raise UserError(f"{p_hi}: pixel size {hi:g} A/px in its MRC header, but {p_lo} has {lo:g} A/px; expected "
                            f"one pixel size per run: pick or preprocess them separately, or rescale them to one "
                            f"pixel size first")
    if given is not None:
        if not (math.isfinite(given) and given > 0):
            raise UserError(f"--pixel-size is {given!r}, expected a positive number of Angstrom per pixel")
        off = {p: v for p, v in known.items() if abs(v - given) > given * PIXEL_SIZE_TOLERANCE}
        if off:
            p, v = next(iter(off.items()))
            log.warning("--pixel-size %g A/px differs from the MRC header of %s (%g A/px); using --pixel-size", given,
                        p, v)
        return float(given), "--pixel-size"
    if known:
        if len(known) < len(headers):
            missing = next(p for p, v in headers.items() if v is None)
            raise UserError(f"{missing}: has no pixel size, but the MRC headers of the other micrographs do; "
                            f"pass --pixel-size")
        return float(next(iter(known.values()))), "the MRC headers"
    from_star = star_pixel_size(star) if star is not None else None
    if from_star is not None:
        return from_star, f"the optics block of {star}"
    return None, "unknown"


# ----------------------------------------------------------------------------- reading coordinates
def read_coordinates(path, micrograph=None):
    """Read particle centres from a STAR, BOX, CSV, TSV or TXT file, or a directory of them.

    Returns ``(df, info)``: ``df`` has the columns ``micrograph, x, y, score`` (see the module
    docstring); ``info`` is one line saying which columns were used. When the file names no
    micrograph, ``micrograph`` (if given) or the file's stem is used.

    * STAR: every data block with ``rlnCoordinateX`` / ``rlnCoordinateY`` (other blocks, such
      as RELION's optics block, are skipped); micrograph from ``rlnMicrographName``, else, when
      several blocks hold coordinates, from each block's name (RELION's one ``data_<micrograph>``
      block per micrograph); score from ``rlnAutopickFigureOfMerit`` when present. Two blocks
      with the same name are an error (a STAR reader would keep only one of them).
    * BOX (EMAN): whitespace columns ``x y width height [ignored...]`` where ``x, y`` is the
      box corner with the smallest x and y (EMAN's "lower left": its y axis points up, ours
      is the row index, and we do not flip); the centre is ``(x + width/2, y + height/2)``.
    * CSV (comma), TSV (tab), TXT (tab if the first line has one, else any whitespace):
      a header row; columns matched case-insensitively against :data:`X_NAMES`,
      :data:`Y_NAMES`, :data:`MICROGRAPH_NAMES`, :data:`SCORE_NAMES` (first listed wins).

    A directory's files (those with :data:`COORDINATE_SUFFIXES`) are read in name order and
    concatenated; a file there without coordinates (an empty BOX file is how EMAN tools say
    "no particles") is skipped with a warning. A single file without coordinates, missing
    columns, or non-numeric / NaN x or y raise UserError.
    """
    path = Path(path)
    if path.is_dir():
        return _read_coordinate_dir(path, micrograph)
    if not path.is_file():
        raise UserError(f"{path}: coordinates file or directory {not_a_file(path)}")
    df, how = _read_coordinate_file(path, micrograph)
    if len(df) == 0:
        raise UserError(f"{path}: file has no coordinates; expected at least one particle")
    return df, f"{path}: {len(df)} coordinates; {how}"


def _read_coordinate_dir(path, micrograph):
    files = sorted((p for p in path.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in COORDINATE_SUFFIXES),
                   key=lambda p: p.name)
    if not files:
        raise UserError(f"{path}: directory has no coordinate files; expected names ending in "
                        f"{', '.join(COORDINATE_SUFFIXES)}")
    frames, hows = [], []
    for f in files:
        df, how = _read_coordinate_file(f, micrograph)
        if len(df) == 0:
            logger.warning("%s: no coordinates; skipped", f)
            continue
        frames.append(df)
        how = how.replace(f"micrograph '{f.stem}' (the file name)", "micrograph from each file name")
        if how not in hows:
            hows.append(how)
    if not frames:
        raise UserError(f"{path}: none of its {len(files)} coordinate files has coordinates; "
                        f"expected at least one particle")
    df = pd.concat(frames, ignore_index=True)
    return df, f"{path}: {len(df)} coordinates from {len(frames)} files; {'; '.join(hows)}"


def _read_coordinate_file(path, micrograph):
    """``(df, how)`` for one file; ``df`` may have no rows (the callers decide)."""
    suffix = path.suffix.lower()
    if suffix not in COORDINATE_SUFFIXES:
        raise UserError(f"{path}: unknown coordinates suffix '{path.suffix}'; expected one of "
                        f"{', '.join(COORDINATE_SUFFIXES)}")
    if path.stat().st_size == 0:
        return _empty_table(), "empty file"
    if suffix == ".star":
        return _read_star(path, micrograph)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's BOM is not part of the header
    except UnicodeDecodeError:
        raise UserError(f"{path}: is not a UTF-8 text file; expected a coordinates table") from None
    if not text.strip():
        return _empty_table(), "empty file"
    if suffix == ".box":
        return _read_box(path, text, micrograph)
    if suffix == ".csv":
        sep = ","
    elif suffix == ".tsv":
        sep = "\t"
    else:  # .txt: sniff from the header line
        first = next(line for line in text.splitlines() if line.strip())
        sep = "\t" if "\t" in first else r"\s+"
    return _read_table(path, text, sep, micrograph)


def _empty_table():
    return pd.DataFrame({"micrograph": pd.Series([], dtype=str), "x": pd.Series([], dtype=np.float64),
                         "y": pd.Series([], dtype=np.float64), "score": pd.Series([], dtype=np.float64)})


def _table(names, x, y, score=None):
    n = len(x)
    return pd.DataFrame({
        "micrograph": pd.Series(list(names) if not isinstance(names, str) else [names] * n, dtype=str),
        "x": np.asarray(x, dtype=np.float64),
        "y": np.asarray(y, dtype=np.float64),
        "score": np.full(n, np.nan) if score is None else np.asarray(score, dtype=np.float64),
    })


def _numbers(path, column, values, allow_missing=False):
    """``values`` (a Series) as float64; the first non-number raises UserError with its row.

    Rows are counted from 1 = the first data row (after a header). With ``allow_missing``,
    empty cells and ``nan`` are NaN instead of errors (used for scores).
    """
    values = values.reset_index(drop=True)
    numbers = np.array(pd.to_numeric(values, errors="coerce"), dtype=np.float64)
    bad = ~np.isfinite(numbers)
    if allow_missing:
        missing = (values.isna() | values.astype(str).str.strip().str.lower().isin(["", "nan", "<na>"])).to_numpy()
        bad &= ~missing
        numbers[missing] = np.nan
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(f"{path}: column '{column}' has the value {str(values[row])!r} in data row {row + 1}; "
                        f"expected {'numbers' if allow_missing else 'finite numbers (no NaN or empty cells)'}")
    return numbers


def _names(path, column, values):
    names = values.astype(str).str.strip().reset_index(drop=True)
    empty = (names == "") | values.isna().reset_index(drop=True)
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise UserError(f"{path}: column '{column}' is empty in data row {row + 1}; expected a micrograph name")
    return names


def _star_block_names(path):
    """Names of the data blocks of a STAR file in file order (``data_x`` -> ``x``), from its text:
    ``starfile`` returns a dict, which keeps only the last of two blocks with the same name."""
    names = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            word = line.split("#", 1)[0].strip()
            if word.startswith("data_"):
                names.append(word[len("data_"):].split()[0] if word[len("data_"):].strip() else "")
    return names


def _read_star(path, micrograph):
    """Every data block with rlnCoordinateX/Y (RELION writes one per micrograph in some layouts)."""
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnMicrographName"])
    except Exception as exc:
        raise UserError(f"{path}: cannot be parsed as STAR ({_one_line(exc)})") from None
    names = _star_block_names(path)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{path}: data block 'data_{twice[0]}' appears {names.count(twice[0])} times; expected "
                        f"one block per name (a STAR reader keeps only the last one, so particles would be lost)")
    found = []
    for name, candidate in blocks.items():
        if isinstance(candidate, dict):  # a single particle written as key-value pairs
            candidate = pd.DataFrame({k: [v] for k, v in candidate.items()})
        if {"rlnCoordinateX", "rlnCoordinateY"} <= set(candidate.columns):
            found.append((str(name), candidate))
    if not found:
        seen = sorted({str(c) for b in blocks.values() for c in (b.keys() if isinstance(b, dict) else b.columns)})
        raise UserError(f"{path}: no STAR data block with rlnCoordinateX and rlnCoordinateY; found columns "
                        f"{seen[:12] if seen else 'none'}; expected a particle or coordinate STAR file")
    several = len(found) > 1
    tables, sources = [], []
    for name, block in found:
        where = f" (block data_{name})" if several else ""
        x = _numbers(path, f"rlnCoordinateX{where}", block["rlnCoordinateX"])
        y = _numbers(path, f"rlnCoordinateY{where}", block["rlnCoordinateY"])
        if "rlnMicrographName" in block.columns:
            mic = _names(path, f"rlnMicrographName{where}", block["rlnMicrographName"])
            source = "micrograph from 'rlnMicrographName'"
        elif several:  # one block per micrograph: the block is named after it
            if not name:
                raise UserError(f"{path}: {len(found)} data blocks hold coordinates, and one of them has neither a "
                                f"name nor an rlnMicrographName column; expected data_<micrograph> blocks or that "
                                f"column")
            mic, source = name, "micrograph from each block's name (data_<micrograph>)"
        else:
            mic = micrograph if micrograph is not None else path.stem
            source = f"micrograph '{mic}' ({'given' if micrograph is not None else 'the file name'})"
        score = None
        if "rlnAutopickFigureOfMerit" in block.columns:
            score = _numbers(path, f"rlnAutopickFigureOfMerit{where}", block["rlnAutopickFigureOfMerit"],
                             allow_missing=True)
        tables.append(_table(mic, x, y, score))
        for text in (source, "x from 'rlnCoordinateX', y from 'rlnCoordinateY'",
                     "score from 'rlnAutopickFigureOfMerit'" if score is not None else "no score column"):
            if text not in sources:
                sources.append(text)
    how = (f"{len(found)} data blocks, " if several else "") + ", ".join(sources)
    return pd.concat(tables, ignore_index=True) if several else tables[0], how


def _read_box(path, text, micrograph):
    corners, sizes = [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields[:4]]
        except ValueError:
            values = []
        if len(fields) < 4 or len(values) < 4 or not all(math.isfinite(v) for v in values):
            raise UserError(f"{path}: line {number} is {line.strip()!r}; expected at least 4 numeric columns "
                            f"(x_lowerleft y_lowerleft width height) in an EMAN BOX file")
        corners.append(values[:2])
        sizes.append(values[2:4])
    corners, sizes = np.array(corners, dtype=np.float64), np.array(sizes, dtype=np.float64)
    centres = corners + sizes / 2
    name = micrograph if micrograph is not None else path.stem
    how = (f"EMAN BOX (centre = corner + size/2), micrograph '{name}' "
           f"({'given' if micrograph is not None else 'the file name'}), no score column")
    return _table(name, centres[:, 0], centres[:, 1]), how


def _find_column(header, accepted):
    """Position of the first ``accepted`` name (case-insensitive) in ``header``, or None."""
    lower = [h.lower() for h in header]
    for name in accepted:
        if name.lower() in lower:
            return lower.index(name.lower())
    return None


def _read_table(path, text, sep, micrograph):
    try:
        # header=None: a data row longer than the header is an error, not a silent index column
        raw = pd.read_csv(io.StringIO(text), sep=sep, header=None, dtype=str, keep_default_na=False)
    except Exception as exc:  # ragged rows, bad quoting
        raise UserError(f"{path}: cannot be parsed as a table ({_one_line(exc)})") from None
    header = [str(h).strip() for h in raw.iloc[0]]
    rows = raw.iloc[1:].reset_index(drop=True)
    ix, iy = _find_column(header, X_NAMES), _find_column(header, Y_NAMES)
    if ix is None or iy is None:
        raise UserError(f"{path}: no x/y coordinate columns in the header {header}; expected a header row "
                        f"with x from one of {', '.join(X_NAMES)} and y from one of {', '.join(Y_NAMES)}")
    x = _numbers(path, header[ix], rows.iloc[:, ix])
    y = _numbers(path, header[iy], rows.iloc[:, iy])
    im, iscore = _find_column(header, MICROGRAPH_NAMES), _find_column(header, SCORE_NAMES)
    if im is not None:
        names = _names(path, header[im], rows.iloc[:, im])
        how = [f"micrograph from '{header[im]}'"]
    else:
        names = micrograph if micrograph is not None else path.stem
        how = [f"micrograph '{names}' ({'given' if micrograph is not None else 'the file name'})"]
    how.append(f"x from '{header[ix]}', y from '{header[iy]}'")
    score = None
    if iscore is not None:
        score = _numbers(path, header[iscore], rows.iloc[:, iscore], allow_missing=True)
        how.append(f"score from '{header[iscore]}'")
    else:
        how.append("no score column")
    return _table(names, x, y, score), ", ".join(how)


# ----------------------------------------------------------------------------- writing coordinates
def write_star(path, df, pixel_size=None):
    """Write ``df`` (micrograph, x, y[, score]) as one STAR loop, atomically.

    Columns ``_rlnMicrographName _rlnCoordinateX _rlnCoordinateY _rlnAutopickFigureOfMerit``;
    the score column is left out when ``df`` has none or all its scores are NaN (single
    missing scores are written as ``nan``). Numbers have 6 decimals. With ``pixel_size``
    (Angstrom per pixel) the file is laid out as RELION 3.1+ writes particles: a ``data_optics``
    block (one group with ``_rlnMicrographPixelSize``) then ``data_particles`` with
    ``_rlnOpticsGroup``.
    """
    block = pd.DataFrame({
        "rlnMicrographName": df["micrograph"].astype(str).to_numpy(),
        "rlnCoordinateX": df["x"].to_numpy(dtype=np.float64),
        "rlnCoordinateY": df["y"].to_numpy(dtype=np.float64),
    })
    if "score" in df.columns and df["score"].notna().any():
        block["rlnAutopickFigureOfMerit"] = df["score"].to_numpy(dtype=np.float64)
    if pixel_size is None:
        text = starfile.to_string(block, float_format="%.6f", na_rep="nan")
    else:
        block["rlnOpticsGroup"] = 1
        optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                               "rlnMicrographPixelSize": [float(pixel_size)]})
        text = starfile.to_string({"optics": optics, "particles": block}, float_format="%.6f", na_rep="nan")
    atomic_write(path, lambda f: f.write(text), mode="w")


def _box_number(value):
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def write_box(path, df, box_size):
    """Write one micrograph's rows as an EMAN BOX file, atomically.

    Each line is ``x-size/2 <tab> y-size/2 <tab> size <tab> size`` (the corner with the
    smallest x and y, see :func:`read_coordinates`); numbers have at most 2 decimals with
    trailing zeros and dot removed (306.5 -> ``306.5``, 306.0 -> ``306``). An empty ``df``
    gives an empty file (EMAN's "no particles").
    """
    if not box_size > 0:
        raise ValueError(f"box_size must be positive, got {box_size}")
    if "micrograph" in df.columns and df["micrograph"].map(micrograph_key).nunique() > 1:
        raise ValueError(f"write_box writes one micrograph, got {df['micrograph'].map(micrograph_key).nunique()}")
    half, size = box_size / 2, _box_number(box_size)
    lines = [f"{_box_number(x - half)}\t{_box_number(y - half)}\t{size}\t{size}\n"
             for x, y in zip(df["x"].to_numpy(dtype=np.float64), df["y"].to_numpy(dtype=np.float64))]
    atomic_write(path, lambda f: f.writelines(lines), mode="w")


def write_csv(path, df):
    """Write ``df`` as CSV with the header ``micrograph,x,y,score`` (NaN score = empty cell), atomically."""
    out = pd.DataFrame({
        "micrograph": df["micrograph"].astype(str).to_numpy(),
        "x": df["x"].to_numpy(dtype=np.float64),
        "y": df["y"].to_numpy(dtype=np.float64),
        "score": df["score"].to_numpy(dtype=np.float64) if "score" in df.columns else np.nan,
    })
    atomic_write(path, lambda f: out.to_csv(f, index=False), mode="w")


# ----------------------------------------------------------------------------- matching
def check_coordinates(df, sizes, source, logger=None):
    """Keep the rows of ``df`` that lie on a known micrograph; warn about the others.

    ``sizes`` maps :func:`micrograph_key` -> ``(H, W)``. A row is kept when its key is in
    ``sizes`` and its centre lies in ``[0, W) x [0, H)``. One warning line (naming
    ``source``) each for rows dropped for an unknown micrograph (up to 3 names listed) and
    for rows outside their micrograph (one example). UserError when no row has a known
    micrograph. Returns a copy with a new index and an extra column ``key``.
    """
    log = logger if logger is not None else logging.getLogger(__name__)  # the argument hides the module's
    keys = df["micrograph"].map(micrograph_key).astype(str)
    known = keys.isin(list(sizes)).to_numpy()
    if not known.any():
        ours = list(dict.fromkeys(keys))[:3]
        theirs = list(sizes)[:3]
        raise UserError(f"{source}: no coordinate's micrograph name matches a micrograph ({len(df)} rows, "
                        f"names like {ours}); expected names among the micrographs, like {theirs}")
    if not known.all():
        unknown = list(dict.fromkeys(keys[~known]))
        shown = ", ".join(repr(k) for k in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        log.warning("%s: dropped %d of %d coordinates whose micrograph is not among the micrographs "
                    "(%d names: %s)", source, int((~known).sum()), len(df), len(unknown), shown)
    h = np.array([sizes[k][0] if ok else 0 for k, ok in zip(keys, known)], dtype=np.float64)
    w = np.array([sizes[k][1] if ok else 0 for k, ok in zip(keys, known)], dtype=np.float64)
    x, y = df["x"].to_numpy(dtype=np.float64), df["y"].to_numpy(dtype=np.float64)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    outside = known & ~inside
    if not (known & inside).any():
        shapes = pd.Series([f"{W}x{H}" for H, W in (sizes[k] for k in dict.fromkeys(keys[known]))]).value_counts()
        raise UserError(f"{source}: no coordinate lies inside any micrograph: the {int(known.sum())} coordinates of "
                        f"known micrographs span x {x[known].min():g}..{x[known].max():g}, y "
                        f"{y[known].min():g}..{y[known].max():g}, and the micrographs are "
                        + ", ".join(f"{shape} px" + (f" ({n} micrographs)" if n > 1 else "")
                                    for shape, n in shapes.items())
                        + " (width x height); expected centres in the original micrographs' pixels, x in [0, width) "
                          "and y in [0, height)")
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        log.warning("%s: dropped %d coordinates outside their micrograph, e.g. x=%g, y=%g on '%s' "
                    "(width %d, height %d)", source, int(outside.sum()), x[i], y[i], df["micrograph"].iloc[i],
                    int(w[i]), int(h[i]))
    out = df[known & inside].copy()
    out["key"] = keys[known & inside].to_numpy()
    return out.reset_index(drop=True)


def drop_duplicate_coordinates(df, source, logger=None, min_distance=1.0):
    """``df`` without repeated particles: a centre closer than ``min_distance`` px to another on the
    same micrograph (same :func:`micrograph_key`) is dropped, keeping the highest-scored one (the first
    row among equal or missing scores). One warning line naming ``source`` gives the count and an
    example; a file with every row twice would otherwise count each particle twice (twice the
    positives in training, every reference particle twice in an evaluation). Returns a copy with a
    new index."""
    log = logger if logger is not None else logging.getLogger(__name__)
    if len(df) < 2:
        return df.reset_index(drop=True)
    keys = df["micrograph"].map(micrograph_key).astype(str).to_numpy()
    xy = df[["x", "y"]].to_numpy(dtype=np.float64)
    score = df["score"].to_numpy(dtype=np.float64) if "score" in df.columns else np.zeros(len(df))
    score = np.where(np.isnan(score), -np.inf, score)
    rank = np.empty(len(df), dtype=np.int64)
    rank[np.lexsort((np.arange(len(df)), -score))] = np.arange(len(df))  # 0 = kept first
    dropped = np.zeros(len(df), dtype=bool)
    radius = np.nextafter(float(min_distance), 0.0)  # closer than min_distance (query_pairs includes r)
    for rows in pd.Series(keys).groupby(keys, sort=False).indices.values():
        if len(rows) < 2:
            continue
        pairs = cKDTree(xy[rows]).query_pairs(radius, output_type="ndarray")
        if not len(pairs):
            continue
        a, b = rows[pairs[:, 0]], rows[pairs[:, 1]]
        first, second = np.where(rank[a] < rank[b], a, b), np.where(rank[a] < rank[b], b, a)
        for i in np.argsort(rank[first], kind="stable"):  # a kept row drops its lower-ranked neighbours
            if not dropped[first[i]]:
                dropped[second[i]] = True
    if dropped.any():
        i = int(np.flatnonzero(dropped)[0])
        log.warning("%s: dropped %d duplicate coordinate(s): centres closer than %g px to another on the same "
                    "micrograph (e.g. x=%g, y=%g on '%s'); each particle counts once", source, int(dropped.sum()),
                    min_distance, xy[i, 0], xy[i, 1], df["micrograph"].iloc[i])
    return df[~dropped].reset_index(drop=True)
