"""ANA annotations, tiling of whole images into instances, and the cached tile datasets.

A *bag* is one whole image (one CSV row, labels in ``TARGET``); its *instances* are the
non-overlapping ``tile_size`` squares cut from it (the border remainder is dropped), each
resized to ``image_size``. A pre-tiled CSV (one row per tile image plus a column naming its
bag) is also accepted: then each row is one instance, and rows sharing a bag form the bag.

Decoding whole microscope images is the slow part, so every image is decoded once to build
a uint8 tile cache (a ``.npy`` file read through a memory map); epochs then read tiles only.
"""
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from utils.checks import not_a_file
from utils.distributed import DistInfo, barrier
from utils.errors import UserError
from utils.logger import progress

REQUIRED_COLUMNS = ("path", "TARGET", "Split")
SPLITS = ("train", "val", "test")


def parse_target(value, where):
    """``"0 3 5"`` -> sorted list of class indices; errors name ``where`` (file:row)."""
    text = str(value).strip()
    if not text:
        raise UserError(f"{where}: TARGET is empty (expected space-separated class indices such as '0 3 5')")
    try:
        labels = sorted({int(tok) for tok in text.split()})
    except ValueError:
        raise UserError(f"{where}: TARGET {text!r} is not a list of integers (expected e.g. '0 3 5')") from None
    if labels[0] < 0:
        raise UserError(f"{where}: TARGET {text!r} has a negative class index")
    return labels


def read_annotations(csv_path, num_classes=None, bag_column=None):
    """Read and validate an annotation CSV; returns ``(frame, num_classes)``.

    The frame gains ``labels`` (list of ints) and keeps every original column. When
    ``num_classes`` is None it is inferred as the largest class index + 1.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        problem = "is a directory, expected a CSV file" if csv_path.is_dir() else not_a_file(csv_path)
        raise UserError(f"annotation file {csv_path} {problem} (set PATH_TRAIN_ANNFILE in config.py or --annFile)")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise UserError(f"annotation file {csv_path} cannot be read as CSV ({type(exc).__name__}: {exc})") from None
    required = REQUIRED_COLUMNS + ((bag_column,) if bag_column else ())
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"annotation file {csv_path} has no column {missing[0]!r} "
                        f"(expected columns {', '.join(required)}; found {', '.join(map(str, df.columns))})")
    df["Split"] = df["Split"].str.strip().str.lower()
    bad_split = df.loc[~df["Split"].isin(SPLITS), "Split"]
    if len(bad_split):
        row = bad_split.index[0] + 2  # 1-based, after the header line
        raise UserError(f"{csv_path}:{row}: Split {bad_split.iloc[0]!r} is not one of {', '.join(SPLITS)}")
    df["labels"] = [parse_target(v, f"{csv_path}:{i + 2}") for i, v in enumerate(df["TARGET"])]
    largest = max((labels[-1] for labels in df["labels"]), default=-1)
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        row = next(i for i, labels in enumerate(df["labels"]) if labels[-1] >= num_classes)
        raise UserError(f"{csv_path}:{row + 2}: TARGET {df['TARGET'].iloc[row]!r} has class {df['labels'].iloc[row][-1]} "
                        f"outside 0..{num_classes - 1} (NUM_CATEGORIES in config.py / --numClasses is {num_classes})")
    return df, num_classes


def multi_hot(label_lists, num_classes):
    out = torch.zeros(len(label_lists), num_classes)
    for i, labels in enumerate(label_lists):  # once per bag at start-up, not per step
        out[i, labels] = 1.0
    return out


@dataclass
class TileSet:
    """The instances of one split: which image and box each tile comes from, and its bag."""

    bags: pd.DataFrame          # one row per bag: bag, path (first image), TARGET, labels
    bag_labels: torch.Tensor    # [B, C] multi-hot
    image_paths: list           # absolute path of each tile's source image
    boxes: np.ndarray           # [T, 4] (left, top, right, bottom) in the source image, or -1 = whole image
    tile_bag: torch.Tensor      # [T] index into bags

    @property
    def tile_labels(self):
        """[T, C] labels of each tile, copied from its bag."""
        return self.bag_labels[self.tile_bag]

    def __len__(self):
        return len(self.image_paths)


# Pillow modes of images with more than 8 bits per channel. They are refused rather than scaled:
# converting them to the 8-bit RGB the network and MEAN/STD expect needs an intensity mapping
# that the file does not give (12-bit camera data in 16-bit containers, floats of any range),
# and a fixed guess (Pillow clips 16-bit values at 255 and turns floats black) trains on images
# that differ from the ones the user sees. README, ANA "Data", says how to convert.
WIDE_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def _wide_mode(mode):
    """What a Pillow mode with more than 8 bits per channel is ("16-bit integer", ...), else None."""
    if mode.startswith("I;16"):
        return "16-bit integer"
    return WIDE_MODES.get(mode)


def _image_size(path):
    """``(width, height)`` from the header; UserError for a missing, unreadable or >8-bit image,
    for a path that is not a regular file (a FIFO would hang the read) and for a header that claims
    more pixels than Pillow decodes (a decompression bomb)."""
    problem = not_a_file(path)
    if problem and problem != "does not exist":
        raise UserError(f"image {path} {problem}; expected an image file (check the CSV's path column)")
    try:
        with Image.open(path) as im:
            wide = _wide_mode(im.mode)
            if wide:
                raise UserError(f"image {path} is a {wide} image (Pillow mode {im.mode}); expected 8-bit grey or "
                                f"RGB: convert it to 8 bits with the intensity range you want (README, ANA "
                                f"'Data')")
            return im.size
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist (check the CSV's path column and DIR_*_IMAGES / --imageDir)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"image {path} cannot be read as an image ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"image {path} cannot be read: {exc} (a corrupt or hostile header); expected an image "
                        f"of at most {2 * Image.MAX_IMAGE_PIXELS} pixels, Pillow's limit") from None


def build_tileset(df, split, image_dir, num_classes, tile_size, bag_column=None, csv_path="annotations",
                  what="rows"):
    """Plan the tiles of ``split`` (reads only image headers, decodes nothing).

    ``what`` names the rows in the error for an empty split (e.g. "single-label rows").
    """
    rows = df[df["Split"] == split].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"annotation file {csv_path} has no {what} with Split == {split!r}")
    image_dir = Path(image_dir)
    paths = [str(image_dir / p) for p in rows["path"]]
    if bag_column:  # pre-tiled: one instance per row, bags from the named column
        tile_bag, bag_names = pd.factorize(rows[bag_column].astype(str))
        label_sets = rows["labels"].map(tuple).groupby(tile_bag).nunique()
        if (label_sets > 1).any():
            bag = bag_names[label_sets.index[label_sets > 1][0]]
            raise UserError(f"{csv_path}: the tiles of bag {bag!r} have different TARGETs; a bag has one label set")
        bags = rows.groupby(tile_bag).first().assign(bag=list(bag_names)).reset_index(drop=True)
        for p in paths:
            _image_size(p)
        boxes = np.full((len(paths), 4), -1, dtype=np.int64)
        tile_paths = paths
    else:
        bags = rows.assign(bag=rows["path"])
        tile_paths, boxes, tile_bag = [], [], []
        for b, p in enumerate(paths):
            w, h = _image_size(p)
            nx, ny = w // tile_size, h // tile_size
            if nx == 0 or ny == 0:
                raise UserError(f"image {p} is {w}x{h}, smaller than one {tile_size}x{tile_size} tile "
                                f"(lower --tileSize or drop the image)")
            for ty in range(ny):
                for tx in range(nx):
                    tile_paths.append(p)
                    boxes.append((tx * tile_size, ty * tile_size, (tx + 1) * tile_size, (ty + 1) * tile_size))
                    tile_bag.append(b)
        boxes = np.asarray(boxes, dtype=np.int64)
    return TileSet(bags=bags, bag_labels=multi_hot(list(bags["labels"]), num_classes), image_paths=tile_paths,
                   boxes=boxes, tile_bag=torch.as_tensor(tile_bag, dtype=torch.long))


def _decode_tiles(path, boxes, image_size):
    """Decode ``path`` once and return its tiles resized to ``image_size`` (uint8, N x N x 3)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            out = []
            for box in boxes:
                tile = im if box[0] < 0 else im.crop(tuple(int(v) for v in box))
                out.append(np.asarray(tile.resize((image_size, image_size), Image.BILINEAR)))
            return out
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise UserError(f"image {path} cannot be decoded ({exc})") from None


def _first(names, limit=3):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_split_overlap(splits, allow_overlap=False):
    """Images listed twice: within a split a warning, across splits an error unless allowed.

    ``splits`` is a list of ``(split, rows, image_dir, csv_path)``; an image is identified by
    its resolved path (``image_dir / path``, symbolic links followed). Returns warning lines for
    the run's log. The same image in train and val/test (or val and test) is a
    :class:`UserError` naming the CSV, the count and the first paths, unless ``allow_overlap``
    (``--allowSplitOverlap``), which turns it into a warning.
    """
    notes, seen = [], {}
    for split, rows, image_dir, csv_path in splits:
        keys = pd.Series([os.path.normcase(os.path.realpath(Path(image_dir) / p)) for p in rows["path"]],
                         index=rows.index)
        repeated = keys.duplicated(keep="first")
        if repeated.any():  # each image listed more than once, named by its first row
            names = list(rows.loc[keys[keys.isin(set(keys[repeated]))].drop_duplicates().index, "path"])
            notes.append(f"warning: {csv_path} {split}: {len(names)} image(s) listed more than once "
                         f"({int(repeated.sum())} extra rows; {_first(names)}); each row counts as a separate image")
        seen[split] = (dict(zip(keys, rows["path"])), csv_path)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if a not in seen or b not in seen:
            continue
        shared = [name for key, name in seen[a][0].items() if key in seen[b][0]]
        if not shared:
            continue
        text = f"{len(shared)} image(s) are in both {a} and {b} ({_first(shared)})"
        if allow_overlap:
            notes.append(f"warning: {seen[b][1]}: {text}; allowed by --allowSplitOverlap")
        else:
            raise UserError(f"{seen[b][1]}: {text}; metrics on images the model trained on (or was selected on) "
                            f"are inflated: fix the Split column, or pass --allowSplitOverlap to train anyway")
    return notes


def tile_cache_key(tiles, image_size):
    """Cache file name that changes when any source image, box or size changes."""
    h = hashlib.sha1()
    for p in dict.fromkeys(tiles.image_paths):
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns};".encode())
    h.update(tiles.boxes.tobytes())
    h.update(f"N={image_size}".encode())
    return f"tiles_{h.hexdigest()[:16]}_{len(tiles)}x{image_size}.npy"


def build_tile_cache(tiles, image_size, cache_dir, num_workers=0, desc="tiles"):
    """Decode every image of ``tiles`` once into a ``[T, N, N, 3]`` uint8 ``.npy``; return its path.

    An existing cache with the same key is reused (no decoding at all). The file is written
    under a temporary name and renamed when complete, so an interrupted build leaves nothing.
    """
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"tile cache directory {cache_dir} cannot be created ({exc.strerror}); set --cacheDir") from None
    path = cache_dir / tile_cache_key(tiles, image_size)
    if path.is_file():
        return path
    order = {}
    for i, p in enumerate(tiles.image_paths):
        order.setdefault(p, []).append(i)
    jobs = list(order.items())
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(tiles), image_size, image_size, 3))
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            results = pool.map(lambda job: (job[1], _decode_tiles(job[0], tiles.boxes[job[1]], image_size)), jobs)
            for idx, decoded in progress(results, desc=f"caching {desc}", total=len(jobs)):
                arr[idx] = np.stack(decoded)
        arr.flush()
        del arr
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class CachedTileDataset(torch.utils.data.Dataset):
    """Tiles from a cache file as ``(uint8 tensor [3, N, N], tile index)``.

    Labels, weights and targets are looked up by tile index in the training loop, where they
    live as tensors: the dataset stays trivial and the loop stays vectorised. Normalisation
    and flips run on the batch on the compute device. The memory map is opened lazily in each
    process, so DataLoader workers share the page cache instead of copying the array.
    """

    def __init__(self, cache_path):
        self.cache_path = str(cache_path)
        self._arr = None
        self._len = len(np.load(self.cache_path, mmap_mode="r"))

    def _array(self):
        if self._arr is None:
            self._arr = np.load(self.cache_path, mmap_mode="r")
        return self._arr

    def __getstate__(self):
        return {**self.__dict__, "_arr": None}

    def __len__(self):
        return self._len

    def __getitem__(self, idx):
        tile = torch.from_numpy(np.array(self._array()[idx])).permute(2, 0, 1)  # copy out of the map
        return tile, idx


def describe(tiles):
    """One-line summary of a TileSet for the log."""
    n_labels = tiles.bag_labels.sum(dim=1)
    return json.dumps({"bags": len(tiles.bags), "tiles": len(tiles),
                       "labels_per_bag": round(n_labels.mean().item(), 2) if len(n_labels) else 0})


def keep_single_label(df, csv_path):
    """Rows of ``df`` with exactly one label, and a log line per split saying what was dropped
    (main_single.py: the reference main_single.py trained on single-label images only)."""
    keep = df["labels"].map(len) == 1
    notes = []
    for split in SPLITS:
        in_split = df["Split"] == split
        dropped = int((in_split & ~keep).sum())
        notes.append(f"{csv_path} {split}: kept {int((in_split & keep).sum())} single-label rows, "
                     f"dropped {dropped} with more than one label")
    return df[keep].reset_index(drop=True), notes


def load_splits(sources, tile_size, *, num_classes=None, bag_column=None, single_label=False,
                allow_overlap=False):
    """Read and validate the annotations and plan the tiles of each split (decodes nothing).

    ``sources``: ``{"train": (csv, image_dir), "test": (csv, image_dir)}``; the train and val
    rows are read from the first, the test rows from the second (the same CSV is read once).
    ``num_classes`` None: inferred from the CSV. ``single_label``: keep only rows with exactly
    one label. Returns ``(tiles, num_classes, notes)``: a TileSet per split and lines for the
    run's log.
    """
    (ann_train, dir_train), (ann_test, dir_test) = sources["train"], sources["test"]
    ann_train, ann_test = Path(ann_train), Path(ann_test)
    df_train, num_classes = read_annotations(ann_train, num_classes, bag_column)
    df_test = df_train if ann_test == ann_train else read_annotations(ann_test, num_classes, bag_column)[0]
    notes = []
    if single_label:
        df_train, notes = keep_single_label(df_train, ann_train)
        if ann_test == ann_train:
            df_test = df_train
        else:
            df_test, test_notes = keep_single_label(df_test, ann_test)
            notes = notes[:2] + test_notes[2:]
    splits = (("train", df_train, dir_train, ann_train), ("val", df_train, dir_train, ann_train),
              ("test", df_test, dir_test, ann_test))
    notes += check_split_overlap([(split, df[df["Split"] == split], image_dir, csv)
                                  for split, df, image_dir, csv in splits], allow_overlap=allow_overlap)
    tiles = {split: build_tileset(df, split, image_dir, num_classes, tile_size, bag_column, csv,
                                  what="single-label rows" if single_label else "rows")
             for split, df, image_dir, csv in splits}
    return tiles, num_classes, notes


def missing_tile_caches(tiles, image_size, cache_dir):
    """Whether any split's tile cache file is missing (a complete, read-only cache needs no write)."""
    return not all((Path(cache_dir) / tile_cache_key(ts, image_size)).is_file() for ts in tiles.values())


def build_tile_caches(tiles, image_size, cache_dir, *, num_workers=0, info=None):
    """The tile cache file of every split; under torchrun the main process (``info``, see
    utils/distributed.py) decodes the tiles and the other processes then reuse its cache."""
    info = info or DistInfo()
    caches = {}
    for first in (True, False):
        if first == info.is_main:
            caches = {split: build_tile_cache(ts, image_size, cache_dir, num_workers, desc=split)
                      for split, ts in tiles.items()}
        barrier(info)
    return caches
