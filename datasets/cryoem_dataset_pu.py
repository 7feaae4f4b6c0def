"""Positive-unlabelled (PU) cryo-EM patch data: loading, validation, splits, P:U batches.

Layout of ``data_dir`` (written by the preprocessing tool or datasets/synthetic_cryoem.py)::

    preprocessed_data.pt            or   chunk_000.pt, chunk_001.pt, ...  (never both)
      {"patches": {"positive": [N_pos, S, S], "unlabeled": [N_unl, S, S]},
       "metadata": {"patch_size": S, "source_micrographs": [...], "prior": ..., ...},
       "val":  {"patches": [N, S, S], "labels": [N] of 0/1},     # optional, labelled
       "test": {"patches": [N, S, S], "labels": [N] of 0/1}}     # optional, labelled
    val.pt, test.pt                 optional labelled sets beside the data, same form

Patches may also be stored as [N, 1, S, S]. float16/32/64 patches are used as stored, uint8
ones are divided by 255. Chunks are sorted by file name with numbers compared as numbers
(chunk_2 before chunk_10). Positives (and likewise unlabelled) are numbered globally in file
order: global index ``g`` lives in the file ``f`` with ``off[f] <= g < off[f+1]``, where
``off`` is the running sum of the per-file counts. Labelled sets found in several places
(any data file, then val.pt / test.pt) are concatenated in that order.

Memory stays bounded: files are opened with ``torch.load(mmap=True)`` (tensors stay on disk
and are paged in on access), at most ``max_open_chunks`` of them per process (least recently
used is dropped first), and a pickled dataset (DataLoader worker) carries no open file.
All files are validated one at a time at load time, so bad data fail before training with
one line naming the file and the key.

Without labelled val/test sets, a seeded fraction of the positives (label 1) and of the
unlabelled patches (label 0) is held out instead. The unlabelled hold-out contains hidden
positives labelled 0, so positive-vs-unlabelled metrics underestimate the true AUC
(for a perfect classifier the P-vs-U AUC is about 1 - prior).
"""
from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from utils.errors import UserError

SPLIT_VERSION = 1
_DATA_FILE = "preprocessed_data.pt"
_CHUNK_GLOB = "chunk_*.pt"
_LABELLED = ("val", "test")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK_ELEMENTS = 1 << 22  # values checked at a time during validation (bounded memory)
_CHECKSUM_RTOL = 1e-10
_CHECK_A, _CHECK_B = 0.7548776662466927, 0.5698402909980532  # checksum weight frequencies


# ----------------------------------------------------------------------------- file access
class _ChunkStore:
    """Lazily opened data files with a per-process LRU of at most ``max_open`` entries.

    ``get(f)`` returns file ``f``'s loaded dict (tensors memory-mapped from disk). Pickling
    drops the open files, so DataLoader workers start with none and open their own.
    """

    def __init__(self, files, max_open):
        self.files = [Path(p) for p in files]
        self.max_open = int(max_open)
        self._open = OrderedDict()

    def get(self, f):
        obj = self._open.get(f)
        if obj is None:
            obj = _torch_load(self.files[f])
            self._open[f] = obj
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(f)
        return obj

    @property
    def n_open(self):
        return len(self._open)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def _torch_load(path):
    return torch.load(path, mmap=True, weights_only=True, map_location="cpu")


class _Pool:
    """A virtual concatenation of same-kind tensors stored in several files.

    ``segments`` is a list of ``(file index, key path)`` (e.g. ``("patches", "positive")``,
    ``("val", "patches")``, ``("patches",)`` for val.pt); ``counts`` are their lengths.
    """

    def __init__(self, segments, counts):
        self.segments = list(segments)
        self.counts = [int(c) for c in counts]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])

    def __len__(self):
        return int(self.offsets[-1])

    def locate(self, g):
        """(file index, key path, local index) of global item ``g``."""
        s = int(np.searchsorted(self.offsets, g, side="right")) - 1
        f, key = self.segments[s]
        return f, key, int(g - self.offsets[s])


def _as_patch(t):
    """One stored patch ([S, S] or [1, S, S], float or uint8) -> float32 [1, S, S] copy."""
    if t.dtype == torch.uint8:
        t = t.to(torch.float32) / 255.0
    else:
        t = t.to(torch.float32, copy=True)
    return t.unsqueeze(0) if t.dim() == 2 else t


def _read(store, pool, g):
    f, key, local = pool.locate(g)
    t = store.get(f)
    for k in key:
        t = t[k]
    return _as_patch(t[local])


# ----------------------------------------------------------------------------- datasets
class PUTrainDataset(Dataset):
    """Training patches: items ``0..n_pos-1`` are positives, ``n_pos..`` unlabelled.

    ``ds[i] -> (patch float32 [1, S, S], is_positive: bool, i)``; ``is_positive`` is a bool
    tensor over all items. ``pos_index`` / ``unl_index`` are the global indices of the items
    in the positive / unlabelled pools.
    """

    def __init__(self, store, pos_pool, unl_pool, pos_index, unl_index):
        self.store, self.pos_pool, self.unl_pool = store, pos_pool, unl_pool
        self.pos_index = torch.as_tensor(pos_index, dtype=torch.int64)
        self.unl_index = torch.as_tensor(unl_index, dtype=torch.int64)
        self.n_pos, self.n_unl = len(self.pos_index), len(self.unl_index)
        self.is_positive = torch.arange(self.n_pos + self.n_unl) < self.n_pos

    def __len__(self):
        return self.n_pos + self.n_unl

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} training patches")
        if i < self.n_pos:
            return _read(self.store, self.pos_pool, int(self.pos_index[i])), True, i
        return _read(self.store, self.unl_pool, int(self.unl_index[i - self.n_pos])), False, i


class LabelledPatchDataset(Dataset):
    """Evaluation patches with 0/1 labels: ``ds[i] -> (patch float32 [1, S, S], label, i)``.

    ``label`` is a float32 0-dim tensor (0. or 1.), so a DataLoader batches it as float32 [B].
    Item ``i`` is item ``index[i]`` of pool ``pools[pool_id[i]]``; ``labels`` is a float32
    tensor [N]. ``heldout`` says whether these are positive-vs-unlabelled hold-outs.
    """

    def __init__(self, store, pools, pool_id, index, labels, heldout):
        self.store, self.pools = store, list(pools)
        self.pool_id = torch.as_tensor(pool_id, dtype=torch.int64)
        self.index = torch.as_tensor(index, dtype=torch.int64)
        self.labels = torch.as_tensor(labels, dtype=torch.float32)
        self.heldout = bool(heldout)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} labelled patches")
        pool = self.pools[int(self.pool_id[i])]
        return _read(self.store, pool, int(self.index[i])), self.labels[i].clone(), i


@dataclass
class PUData:
    """What :func:`load_pu_data` returns.

    ``train`` / ``val`` / ``test``: the datasets; ``heldout``: True when val or test (or
    both; see ``val.heldout`` / ``test.heldout``) are positive-vs-unlabelled hold-outs;
    ``split``: plain dict for checkpoints, pass it back as ``load_pu_data(split=...)`` to
    resume; ``patch_size``; ``n_pos`` / ``n_unl``: training counts; ``metadata``: the first
    data file's metadata dict; ``files``: the data files, then val.pt / test.pt if present.
    """

    train: PUTrainDataset
    val: LabelledPatchDataset
    test: LabelledPatchDataset
    heldout: bool
    split: dict
    patch_size: int
    n_pos: int
    n_unl: int
    metadata: dict = field(default_factory=dict)
    files: list = field(default_factory=list)


# ----------------------------------------------------------------------------- validation
def _natural_key(path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _find_files(data_dir):
    single = data_dir / _DATA_FILE
    chunks = sorted((p for p in data_dir.glob(_CHUNK_GLOB)), key=_natural_key)
    if single.exists() and chunks:
        raise UserError(f"{data_dir} holds both {_DATA_FILE} and {len(chunks)} {_CHUNK_GLOB} "
                        f"files; keep one layout")
    if single.exists():
        return [single]
    if not chunks:
        raise UserError(f"{data_dir} holds no patch data: looked for {_DATA_FILE} or "
                        f"{_CHUNK_GLOB}")
    return chunks


def _load_checked(path):
    try:
        obj = _torch_load(path)
    except Exception as exc:  # corrupt, foreign, legacy or unsafe file: say which one
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, expected a dict with 'patches'")
    return obj


def _check_patches(path, key, t, expect_size):
    """Validate one patch tensor; return ``(n, S, checksum)``.

    checksum = ``[sum_{i,p} x[i,p] cos(a i + b p), sum x^2, number of values]`` over patch
    ``i`` and flat pixel ``p`` (a, b irrational-ish constants): position-weighted, so a
    reordered or regenerated dataset (standardised patches have a fixed sum of squares)
    changes it. Computed as two matrix-vector products per block of patches.
    """
    if not isinstance(t, torch.Tensor):
        raise UserError(f"{path}: '{key}' is a {type(t).__name__}, expected a tensor [N, S, S]")
    shape = list(t.shape)
    if t.dim() == 4 and shape[1] == 1:
        shape = [shape[0], shape[2], shape[3]]
    elif t.dim() != 3:
        raise UserError(f"{path}: '{key}' has shape {list(t.shape)}, expected [N, S, S] "
                        f"(or [N, 1, S, S])")
    if shape[1] != shape[2]:
        raise UserError(f"{path}: '{key}' has non-square patches {shape[1]}x{shape[2]}")
    if expect_size is not None and shape[1] != expect_size:
        raise UserError(f"{path}: '{key}' has {shape[1]} px patches, other data have "
                        f"{expect_size} px")
    if t.dtype not in _FLOAT_DTYPES and t.dtype != torch.uint8:
        raise UserError(f"{path}: '{key}' has dtype {str(t.dtype).replace('torch.', '')}, "
                        f"expected float32/float16 or uint8")
    n, size = shape[0], shape[1]
    rows = max(1, _BLOCK_ELEMENTS // max(1, size * size))
    bad, total, total_sq = 0, 0.0, 0.0
    pix = torch.arange(size * size, dtype=torch.float64) * _CHECK_B
    cos_p, sin_p = torch.cos(pix), torch.sin(pix)
    for a in range(0, n, rows):  # one block at a time: bounded memory on mmap'd tensors
        x = t[a:a + rows].to(torch.float64).reshape(-1, size * size)
        if t.dtype == torch.uint8:
            x = x / 255.0
        else:
            finite = torch.isfinite(x)
            bad += int((~finite).sum())
            if bad:
                continue
        r = torch.arange(a, a + len(x), dtype=torch.float64) * _CHECK_A
        total += float(torch.cos(r) @ (x @ cos_p) - torch.sin(r) @ (x @ sin_p))
        total_sq += float((x * x).sum())
    if bad:
        raise UserError(f"{path}: '{key}' holds {bad} NaN/inf values")
    return n, size, [total, total_sq, float(n * size * size)]


def _check_labels(path, key, labels, n):
    if not isinstance(labels, torch.Tensor):
        raise UserError(f"{path}: '{key}' is a {type(labels).__name__}, expected a tensor [N]")
    if labels.dim() != 1 or len(labels) != n:
        raise UserError(f"{path}: '{key}' has shape {list(labels.shape)}, expected [{n}] "
                        f"(one label per patch)")
    if labels.is_complex() or not bool(((labels == 0) | (labels == 1)).all()):
        raise UserError(f"{path}: '{key}' holds values other than 0 and 1")
    return labels.to(torch.float32).clone()


def _check_labelled(path, prefix, obj, size):
    """Validate ``{"patches", "labels"}``; return ``(n, S, checksum, labels)``."""
    where = prefix + "." if prefix else ""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: '{prefix or 'file'}' is a {type(obj).__name__}, expected a "
                        f"dict with 'patches' and 'labels'")
    for k in ("patches", "labels"):
        if k not in obj:
            raise UserError(f"{path}: missing key '{where}{k}'")
    n, size, checksum = _check_patches(path, where + "patches", obj["patches"], size)
    if n == 0:
        raise UserError(f"{path}: '{where}patches' is empty")
    return n, size, checksum, _check_labels(path, where + "labels", obj["labels"], n)


def _scan(data_dir, logger):
    """Validate every file one at a time; return what the datasets and the split need."""
    data_files = _find_files(data_dir)
    side = [data_dir / f"{name}.pt" for name in _LABELLED if (data_dir / f"{name}.pt").exists()]
    files = data_files + side
    size, metadata = None, {}
    n_pos, n_unl, checksums = [], [], []
    labelled = {name: {"segments": [], "counts": [], "labels": []} for name in _LABELLED}
    for f, path in enumerate(files):
        obj = _load_checked(path)
        sums = []
        if path in side:
            name = path.stem
            n, size, cs, labels = _check_labelled(path, "", obj, size)
            labelled[name]["segments"].append((f, ("patches",)))
            labelled[name]["counts"].append(n)
            labelled[name]["labels"].append(labels)
            checksums.append(cs)
            del obj
            continue
        if "patches" not in obj:
            raise UserError(f"{path}: missing key 'patches'")
        patches = obj["patches"]
        if not isinstance(patches, dict):
            raise UserError(f"{path}: 'patches' is a {type(patches).__name__}, expected a dict "
                            f"with 'positive' and 'unlabeled'")
        for k, counts in (("positive", n_pos), ("unlabeled", n_unl)):
            if k not in patches:
                raise UserError(f"{path}: missing key 'patches.{k}'")
            n, size, cs = _check_patches(path, f"patches.{k}", patches[k], size)
            counts.append(n)
            sums.append(cs)
        meta = obj.get("metadata", {})
        if not isinstance(meta, dict):
            raise UserError(f"{path}: 'metadata' is a {type(meta).__name__}, expected a dict")
        if "patch_size" in meta and meta["patch_size"] != size:
            raise UserError(f"{path}: 'metadata.patch_size' is {meta['patch_size']!r} but the "
                            f"patches are {size} px")
        if f == 0:
            metadata = meta
        for name in _LABELLED:
            if name in obj:
                n, size, cs, labels = _check_labelled(path, name, obj[name], size)
                labelled[name]["segments"].append((f, (name, "patches")))
                labelled[name]["counts"].append(n)
                labelled[name]["labels"].append(labels)
                sums.append(cs)
        checksums.append([sum(c[i] for c in sums) for i in range(3)])
        del obj, patches
    if sum(n_pos) == 0:
        raise UserError(f"{data_dir} holds no positive patches ('patches.positive' is empty in "
                        f"every file)")
    if sum(n_unl) == 0:
        raise UserError(f"{data_dir} holds no unlabelled patches ('patches.unlabeled' is empty "
                        f"in every file)")
    for name, info in labelled.items():
        if info["labels"]:
            labels = torch.cat(info["labels"])
            info["labels"] = labels
            k = int(labels.sum())
            if k in (0, len(labels)):
                logger.warning("labelled %s set in %s holds only label %d (%d patches): AUC and "
                               "AP are undefined on it", name, data_dir, int(k > 0), len(labels))
    return {"files": files, "n_data_files": len(data_files), "patch_size": size,
            "metadata": metadata, "n_pos": n_pos, "n_unl": n_unl, "checksums": checksums,
            "labelled": labelled}


# ----------------------------------------------------------------------------- splits
def _holdout_count(fraction, n):
    """round(fraction * n), at least 1 when fraction > 0."""
    return 0 if fraction == 0 else max(1, int(math.floor(fraction * n + 0.5)))


def _make_split(scan, val_fraction, test_fraction, seed, data_dir):
    heldout = {name: len(scan["labelled"][name]["counts"]) == 0 for name in _LABELLED}
    fractions = {"val": val_fraction, "test": test_fraction}
    g = torch.Generator().manual_seed(int(seed))
    split = {}
    for kind, counts in (("pos", scan["n_pos"]), ("unl", scan["n_unl"])):
        n = sum(counts)
        perm = torch.randperm(n, generator=g)
        what = "positive" if kind == "pos" else "unlabelled"
        start = 0
        for name in _LABELLED:
            k = _holdout_count(fractions[name], n) if heldout[name] else 0
            if heldout[name] and k == 0:
                raise UserError(f"{data_dir} has no labelled {name} set and {name}_fraction is "
                                f"0: give a labelled {name}.pt or a {name}_fraction > 0")
            split[f"{name}_{kind}"] = perm[start:start + k].sort().values
            start += k
        if n - start < 1:
            held = " and ".join(f"{len(split[f'{s}_{kind}'])} for {s}" for s in _LABELLED if heldout[s])
            raise UserError(
                f"{data_dir} has only {n} {what} patches: holding out {held} (val_fraction="
                f"{val_fraction}, test_fraction={test_fraction}; >= 1 each) leaves none for "
                f"training; add data, lower the fractions or give labelled val.pt/test.pt")
        split[f"train_{kind}"] = perm[start:].sort().values
    return split, heldout


def _fingerprint(scan, data_dir):
    return {"files": [str(p.relative_to(data_dir)) for p in scan["files"]],
            "n_positive": list(scan["n_pos"]), "n_unlabeled": list(scan["n_unl"]),
            "patch_size": int(scan["patch_size"]),
            "n_labelled": {name: int(sum(scan["labelled"][name]["counts"])) for name in _LABELLED},
            "checksums": [[float(v) for v in c] for c in scan["checksums"]]}


def _check_split(split, scan, data_dir):
    """Validate a saved split against the data now in ``data_dir``; return indices, heldout."""
    def changed(what):
        return UserError(f"data in {data_dir} changed since the run started: {what}")

    keys = ["version", "files", "n_positive", "n_unlabeled", "patch_size", "n_labelled",
            "checksums", "heldout"] + [f"{s}_{k}" for s in ("train",) + _LABELLED for k in ("pos", "unl")]
    if not isinstance(split, dict) or any(k not in split for k in keys):
        missing = [k for k in keys if not isinstance(split, dict) or k not in split]
        raise UserError(f"the saved data split is malformed (missing {', '.join(missing)})")
    if split["version"] != SPLIT_VERSION:
        raise UserError(f"the saved data split has version {split['version']}, this code reads "
                        f"version {SPLIT_VERSION}")
    now = _fingerprint(scan, data_dir)
    if list(split["files"]) != now["files"]:
        raise changed(f"files {list(split['files'])} then, {now['files']} now")
    for key, label in (("n_positive", "positive"), ("n_unlabeled", "unlabelled")):
        for name, a, b in zip(now["files"], split[key], now[key]):
            if a != b:
                raise changed(f"{name} held {a} {label} patches then, {b} now")
    if split["patch_size"] != now["patch_size"]:
        raise changed(f"patch size {split['patch_size']} then, {now['patch_size']} now")
    for name in _LABELLED:
        a, b = split["n_labelled"].get(name), now["n_labelled"][name]
        if a != b:
            raise changed(f"labelled {name} set of {a} patches then, {b} now")
    for name, a, b in zip(now["files"], split["checksums"], now["checksums"]):
        tol = _CHECKSUM_RTOL * (abs(b[1]) + b[2] + 1.0)
        if any(abs(float(x) - float(y)) > tol for x, y in zip(a[:2], b[:2])):
            raise changed(f"the patch values in {name} differ (checksum)")
    index = {}
    for kind, n in (("pos", sum(scan["n_pos"])), ("unl", sum(scan["n_unl"]))):
        parts = []
        for s in ("train",) + _LABELLED:
            t = split[f"{s}_{kind}"]
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point():
                raise UserError(f"the saved data split is malformed ('{s}_{kind}' is not a 1D "
                                f"integer tensor)")
            index[f"{s}_{kind}"] = t.to(torch.int64)
            parts.append(index[f"{s}_{kind}"])
        if not torch.equal(torch.cat(parts).sort().values, torch.arange(n)):
            raise changed(f"the saved {kind} indices are not a partition of 0..{n - 1}")
    heldout = {name: bool(split["heldout"][name]) for name in _LABELLED}
    for name in _LABELLED:
        if heldout[name] == (now["n_labelled"][name] > 0):
            raise changed(f"the {name} set was {'held out' if heldout[name] else 'labelled'} "
                          f"then and is not now")
        if not heldout[name] and (len(index[f"{name}_pos"]) or len(index[f"{name}_unl"])):
            raise UserError(f"the saved data split is malformed (labelled {name} set but "
                            f"held-out indices)")
    return index, heldout


# ----------------------------------------------------------------------------- entry point
def load_pu_data(data_dir, val_fraction=0.1, test_fraction=0.1, seed=0, max_open_chunks=4,
                 split=None, logger=None) -> PUData:
    """Validate ``data_dir`` and build the train / val / test datasets (see module docstring).

    Hold-outs (only for a set with no labelled patches): with ``n`` positives, the first
    ``k_val = round(val_fraction * n)`` (>= 1) entries of a ``seed``-ed permutation go to val,
    the next ``k_test`` to test, the rest to train; the unlabelled likewise (own permutation
    from the same generator). Held-out positives get label 1, held-out unlabelled label 0.
    ``split`` (``PUData.split`` from an earlier run) reuses that run's assignment instead,
    after checking that the data did not change (file names, counts, patch size, labelled
    set sizes and a per-file checksum: position-weighted sum and sum of squares); the
    fractions and ``seed`` are then ignored. Every bad input raises :class:`UserError` naming
    the file and key.
    """
    log = logger if logger is not None else logging.getLogger(__name__)
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UserError(f"data directory {data_dir} does not exist")
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} is not a directory")
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise UserError(f"{name} must be a number in [0, 1), got {v!r}")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"val_fraction + test_fraction must be < 1, got "
                        f"{val_fraction} + {test_fraction}")
    if isinstance(max_open_chunks, bool) or not isinstance(max_open_chunks, int) or max_open_chunks < 1:
        raise UserError(f"max_open_chunks must be an integer >= 1, got {max_open_chunks!r}")

    scan = _scan(data_dir, log)
    if split is None:
        index, heldout = _make_split(scan, val_fraction, test_fraction, seed, data_dir)
    else:
        index, heldout = _check_split(split, scan, data_dir)

    store = _ChunkStore(scan["files"], max_open_chunks)
    n_data = scan["n_data_files"]
    pos_pool = _Pool([(f, ("patches", "positive")) for f in range(n_data)], scan["n_pos"])
    unl_pool = _Pool([(f, ("patches", "unlabeled")) for f in range(n_data)], scan["n_unl"])
    train = PUTrainDataset(store, pos_pool, unl_pool, index["train_pos"], index["train_unl"])
    evals = {}
    for name in _LABELLED:
        if heldout[name]:
            p, u = index[f"{name}_pos"], index[f"{name}_unl"]
            evals[name] = LabelledPatchDataset(
                store, [pos_pool, unl_pool],
                torch.cat([torch.zeros(len(p), dtype=torch.int64), torch.ones(len(u), dtype=torch.int64)]),
                torch.cat([p, u]), torch.cat([torch.ones(len(p)), torch.zeros(len(u))]), True)
        else:
            info = scan["labelled"][name]
            pool = _Pool(info["segments"], info["counts"])
            n = len(info["labels"])
            evals[name] = LabelledPatchDataset(store, [pool], torch.zeros(n, dtype=torch.int64),
                                               torch.arange(n), info["labels"], False)
    if any(heldout.values()):
        sets = " and ".join(s for s in _LABELLED if heldout[s])
        log.warning("no labelled %s set in %s: evaluating on held-out positives (label 1) vs "
                    "unlabelled (label 0); the unlabelled hold-out hides positives, so these "
                    "P-vs-U metrics underestimate the true AUC", sets, data_dir)

    saved = {"version": SPLIT_VERSION, **_fingerprint(scan, data_dir),
             "heldout": dict(heldout), "seed": int(seed) if split is None else split.get("seed"),
             "val_fraction": float(val_fraction) if split is None else split.get("val_fraction"),
             "test_fraction": float(test_fraction) if split is None else split.get("test_fraction"),
             **{k: v.clone() for k, v in index.items()}}
    return PUData(train=train, val=evals["val"], test=evals["test"],
                  heldout=any(heldout.values()), split=saved, patch_size=int(scan["patch_size"]),
                  n_pos=train.n_pos, n_unl=train.n_unl, metadata=scan["metadata"],
                  files=list(scan["files"]))


# ----------------------------------------------------------------------------- sampler
def _as_fraction(x):
    return Fraction(x) if isinstance(x, int) else Fraction(str(x)).limit_denominator(10 ** 6)


class PUBatchSampler(Sampler):
    """Fixed-size batches with a fixed positive:unlabelled ratio ``p:u`` in every batch.

    With ``r = p / (p + u)`` and ``B = batch_size``, batch ``b`` holds
    ``P_b = floor((b+1) B r) - floor(b B r)`` positives and ``B - P_b`` unlabelled (B=32,
    [1, 4]: 6 or 7, 6.4 on average; the first ``K`` batches hold ``floor(K B r)`` positives).
    An epoch is the smallest ``K`` with ``K B - floor(K B r) >= n_unl``: one pass over the
    unlabelled set in a permutation seeded by ``(seed, epoch)``, the last batch wrapping into
    a second permutation so it is full. Positives come from consecutive seeded permutations,
    as many as needed. Yields lists of train indices: positives ``0..n_pos-1``, unlabelled
    ``n_pos..n_pos+n_unl-1``. Depends only on ``(seed, epoch)``: resumable.

    Distributed training (``num_replicas`` processes): every process computes the same epoch of
    ``K`` batches and takes batches ``rank, rank + W, rank + 2W, ...``; the last round wraps to
    the first batches so that every process gets ``ceil(K / W)`` batches (DDP needs equal counts).
    Each batch keeps its ratio, and together the processes see every unlabelled patch.
    """

    def __init__(self, n_pos, n_unl, batch_size, ratio=(1, 4), seed=0, num_replicas=1, rank=0):
        if n_pos < 1 or n_unl < 1:
            raise ValueError(f"PUBatchSampler needs >= 1 positive and >= 1 unlabelled item, "
                             f"got {n_pos} and {n_unl}")
        ratio = list(ratio)
        if len(ratio) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  for v in ratio):
            raise UserError(f"batch_ratio must be two positive numbers [positive, unlabelled], "
                            f"got {ratio}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.n_pos, self.n_unl, self.batch_size = int(n_pos), int(n_unl), batch_size
        self.ratio, self.seed, self.epoch = tuple(ratio), int(seed), 0
        p, u = _as_fraction(ratio[0]), _as_fraction(ratio[1])
        self._r = p / (p + u)
        if not self._fits(batch_size):
            smallest = next(b for b in range(2, 10 ** 9) if self._fits(b))
            lo, hi = self._pos_range(batch_size)
            raise UserError(
                f"batch_size {batch_size} with batch_ratio {ratio} gives batches with {lo}-{hi} "
                f"positives and {batch_size - hi}-{batch_size - lo} unlabelled; every batch needs "
                f">= 1 of each: use batch_size >= {smallest}")
        lo, _ = self._pos_range(batch_size)
        if batch_size - lo > self.n_unl:  # one batch would hold unlabelled patches twice (or thousands of times)
            largest = self._largest_batch()
            raise UserError(
                f"batch_size {batch_size} with batch_ratio {ratio} takes {batch_size - lo} unlabelled patches per "
                f"batch, more than the {self.n_unl} unlabelled training patches hold (with {self.n_pos} positive "
                f"ones); "
                + (f"use batch_size <= {largest}" if largest else "the data are too few for any batch size"))
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self._total = self._epoch_length()  # batches of the whole epoch, over all processes
        self._len = -(-self._total // self.num_replicas)

    def _pos_range(self, b):
        x = b * self._r
        return math.floor(x), math.ceil(x)

    def _largest_batch(self):
        """The largest batch size whose unlabelled share fits in the data (and that fits the ratio), or None."""
        b = math.floor(self.n_unl / (1 - self._r)) + 1
        while b > 1 and (b - self._pos_range(b)[0] > self.n_unl or not self._fits(b)):
            b -= 1
        return b if self._fits(b) else None

    def _fits(self, b):
        lo, hi = self._pos_range(b)
        return lo >= 1 and b - hi >= 1

    def _n_pos_first(self, k):
        """Positives in the first ``k`` batches: floor(k B r)."""
        return math.floor(k * self.batch_size * self._r)

    def _epoch_length(self):
        def unl(k):
            return k * self.batch_size - self._n_pos_first(k)
        k = max(1, math.ceil(self.n_unl / (self.batch_size * (1 - self._r))))
        while k > 1 and unl(k - 1) >= self.n_unl:
            k -= 1
        while unl(k) < self.n_unl:
            k += 1
        return k

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self._len

    def _stream(self, n, count, stream):
        """``count`` indices from consecutive permutations of ``range(n)`` for this epoch."""
        rng = np.random.default_rng([self.seed % 2 ** 64, self.epoch % 2 ** 64, stream])
        reps = -(-count // n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])[:count]

    def __iter__(self):
        k, bs = self._total, self.batch_size
        n_pos_total = self._n_pos_first(k)
        pos = self._stream(self.n_pos, n_pos_total, 0)
        unl = self._stream(self.n_unl, k * bs - n_pos_total, 1) + self.n_pos
        for i in range(self._len):
            b = (self.rank + i * self.num_replicas) % k
            p0, p1 = self._n_pos_first(b), self._n_pos_first(b + 1)
            u0, u1 = b * bs - p0, (b + 1) * bs - p1
            yield pos[p0:p1].tolist() + unl[u0:u1].tolist()
