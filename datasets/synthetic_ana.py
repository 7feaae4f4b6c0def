"""Synthetic ANA-like multi-instance multi-label (MIML) images for the demo and the tests.

An image (a *bag*) imitates a HEp-2 immunofluorescence field: dark background, signal in the
green channel, many cells, each drawn with the texture of ONE of eight ANA patterns.

Design
------
* Geometry. The image is a ``tiles_x`` x ``tiles_y`` grid of non-overlapping ``tile_size``
  tiles, exactly the instances the training code cuts out. Each tile holds a jittered 3x3
  grid of cells kept entirely inside the tile, so a tile's true label is the set of classes
  its cells show (stored in ``TILE_TARGETS``). Nucleus radius ~ tile_size/12, so textures
  survive downsampling a tile to 1/4..1/7 of its size.
* Labels. Per split, every image gets 1..max_labels classes, assigned so that every class
  occurs in every split. Each tile shows a non-empty subset of its bag's classes, the union
  over tiles is the bag label, and a multi-label bag always has a tile that shows only part
  of it (a bag label is not every tile's label: the MIML point).
* Drawing. A cell is rendered on its local bounding box only, from two vectorised parts:
  smooth functions of the elliptical distance ``d`` (nucleus d < 1, cytoplasm d < c) and
  sums of Gaussian dots computed as one separable matrix product (no per-pixel loops).
  The signal becomes the green channel, is slightly blurred (Pillow), and gets Gaussian
  noise; red and blue hold a few percent of green plus noise.
* Determinism. ``numpy.random.SeedSequence(seed)`` spawns one generator for the label plan
  and one per image: the same arguments give byte-identical PNGs and CSV.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

CLASS_NAMES: tuple[str, ...] = ("golgi", "homogeneous", "nucleolar", "nuclear_dots",
                                "centromere", "nuclear_envelope", "mitochondrial", "speckled")
_GRID = 3  # cells per tile side


# ----------------------------------------------------------------------------- label plan
def _plan_labels(n: int, num_classes: int, max_labels: int, rng) -> list[list[int]]:
    """Sorted label sets for ``n`` images such that every class occurs at least once."""
    probs = np.array([0.3] + [0.7 / (max_labels - 1)] * (max_labels - 1)) if max_labels > 1 \
        else np.ones(1)
    sizes = rng.choice(np.arange(1, max_labels + 1), size=n, p=probs)
    while sizes.sum() < num_classes:  # grow random images until every class fits
        sizes[rng.choice(np.flatnonzero(sizes < max_labels))] += 1
    slots = rng.permutation(np.repeat(np.arange(n), sizes))  # one slot per (image, label)
    labels: list[set[int]] = [set() for _ in range(n)]
    for cls, img in zip(rng.permutation(num_classes), slots):  # each class once, distinct
        labels[img].add(int(cls))
    for img in slots[num_classes:]:  # remaining slots: random classes new to the image
        free = [c for c in range(num_classes) if c not in labels[img]]
        labels[img].add(int(rng.choice(free)))
    return [sorted(s) for s in labels]


def _plan_tiles(classes: list[int], n_tiles: int, rng) -> list[list[int]]:
    """Non-empty subsets of ``classes``, one per tile, whose union is ``classes``."""
    tiles: list[set[int]] = [set() for _ in range(n_tiles)]
    order = rng.permutation(n_tiles)
    for j, cls in enumerate(rng.permutation(classes)):  # spread classes over distinct tiles
        tiles[order[j % n_tiles]].add(int(cls))
    for t in tiles:
        if not t:
            t.add(int(rng.choice(classes)))
        t.update(c for c in classes if rng.random() < 0.3)  # some tiles mix patterns
    if len(classes) > 1 and n_tiles > 1 and all(len(t) == len(classes) for t in tiles):
        tiles[int(rng.integers(n_tiles))].discard(int(rng.choice(classes)))  # keep MIML
    return [sorted(t) for t in tiles]


# ----------------------------------------------------------------------------- drawing
def _dots(ys, xs, y, x, sigma, amp) -> np.ndarray:
    """Sum of Gaussian dots at (y, x) on the grid ys x xs: separable, one matmul."""
    sigma = np.maximum(sigma, 0.6)
    gy = np.exp(-(ys[None, :] - y[:, None]) ** 2 / (2 * sigma[:, None] ** 2)) * amp[:, None]
    gx = np.exp(-(xs[None, :] - x[:, None]) ** 2 / (2 * sigma[:, None] ** 2))
    return (gy.T @ gx).astype(np.float32)


def _draw_cell(canvas: np.ndarray, cls: int, cy: float, cx: float, r: float, rng) -> None:
    """Draw one cell of pattern ``cls`` centred at (cy, cx) into ``canvas`` (max-blend)."""
    c = rng.uniform(1.4, 1.6)  # cytoplasm / nucleus scale
    if CLASS_NAMES[cls] == "mitochondrial":  # smaller nucleus, same cell: more cytoplasm
        r, c = 0.7 * r, c / 0.7
    a, b = r, r * rng.uniform(0.72, 1.0)  # nucleus semi-axes
    th = rng.uniform(0, np.pi)
    cos, sin = math.cos(th), math.sin(th)
    half = int(math.ceil(c * a)) + 2
    y0, x0 = int(cy) - half, int(cx) - half
    ys = np.arange(y0, y0 + 2 * half + 1, dtype=np.float32) - cy
    xs = np.arange(x0, x0 + 2 * half + 1, dtype=np.float32) - cx
    u = (xs[None, :] * cos + ys[:, None] * sin) / a  # nucleus frame, unit circle = rim
    v = (-xs[None, :] * sin + ys[:, None] * cos) / b
    d = np.sqrt(u * u + v * v)
    nuc = np.clip((1 - d) * b + 0.5, 0, 1)  # anti-aliased masks (~1 px edge)
    cyto = np.clip((c - d) * b + 0.5, 0, 1) * (1 - nuc)

    def dots(n, r_lo, r_hi, sigma, amp, ang=None, spread=np.pi):
        """n dots at normalised radius in [r_lo, r_hi] (area-uniform) and given angles."""
        rad = np.sqrt(rng.uniform(r_lo ** 2, r_hi ** 2, n))
        phi = (0.0 if ang is None else ang) + rng.uniform(-spread, spread, n)
        pu, pv = rad * np.cos(phi) * a, rad * np.sin(phi) * b
        py, px = pu * sin + pv * cos, pu * cos - pv * sin
        return _dots(ys, xs, py, px, np.full(n, sigma * r), amp * rng.uniform(0.7, 1.0, n))

    name = CLASS_NAMES[cls]
    if name == "golgi":  # compact bright crescent + blobs on one side, next to the nucleus
        phi0 = rng.uniform(-np.pi, np.pi)
        dang = np.angle(np.exp(1j * (np.arctan2(v, u) - phi0)))
        f = 0.08 * nuc + 0.7 * np.exp(-((d - 1.2) / 0.14) ** 2 - (dang / 0.35) ** 2)
        f = f + dots(int(rng.integers(3, 7)), 1.1, 1.3, 0.12, 0.7, phi0, 0.35)
    elif name == "homogeneous":  # evenly filled bright nucleus
        f = 0.85 * nuc
    elif name == "nucleolar":  # 2-5 large bright spots in a dim nucleus
        f = 0.15 * nuc + dots(int(rng.integers(2, 6)), 0.1, 0.55, 0.19, 1.0)
    elif name == "nuclear_dots":  # 3-8 discrete medium dots
        f = 0.08 * nuc + dots(int(rng.integers(3, 9)), 0, 0.8, 0.08, 1.0)
    elif name == "centromere":  # 20-40 tiny sharp dots on a dark nucleus
        f = 0.06 * nuc + dots(int(rng.integers(20, 41)), 0, 0.88, 0.045, 1.0)
    elif name == "nuclear_envelope":  # bright rim, darker interior
        f = nuc * (0.12 + 0.85 * np.exp(-((d - 0.88) / 0.11) ** 2))
    elif name == "mitochondrial":  # granular/reticular cytoplasm around a dark nucleus
        f = 0.03 * nuc + cyto * 0.2 + dots(int(rng.integers(200, 300)), 1.05, c - 0.05,
                                            0.08, 0.4)
        f *= cyto + nuc
    else:  # speckled: fine granular speckle over the nucleus
        f = nuc * (0.35 + dots(int(rng.integers(200, 300)), 0, 0.95, 0.035, 0.35))
    if name != "mitochondrial" and rng.random() < 0.5:
        f = f + 0.05 * cyto  # faint cytoplasm on some cells
    box = canvas[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1]
    np.maximum(box, rng.uniform(0.6, 1.0) * f, out=box)


def _render(tile_sets: list[list[int]], tiles_x: int, tiles_y: int, tile_size: int,
            rng) -> np.ndarray:
    """One RGB uint8 image whose tile t (row-major) shows cells of ``tile_sets[t]``."""
    h, w = tiles_y * tile_size, tiles_x * tile_size
    canvas = np.zeros((h, w), np.float32)
    step, r_base = tile_size / _GRID, tile_size / 12
    for t, classes in enumerate(tile_sets):
        ty, tx = divmod(t, tiles_x)
        n_cells = max(len(classes), int(rng.binomial(_GRID * _GRID, 0.85)))
        slots = rng.choice(_GRID * _GRID, n_cells, replace=False)
        kinds = np.concatenate([rng.permutation(classes),
                                rng.choice(classes, n_cells - len(classes))])
        for slot, cls in zip(slots, rng.permutation(kinds)):
            r = r_base * rng.uniform(0.85, 1.1)
            margin = 1.6 * r + 4  # bounding box stays inside its tile
            gy, gx = divmod(int(slot), _GRID)
            cy, cx = ((np.array([gy, gx]) + 0.5 + rng.uniform(-0.2, 0.2, 2)) * step)
            cy = np.clip(cy, margin, tile_size - margin) + ty * tile_size
            cx = np.clip(cx, margin, tile_size - margin) + tx * tile_size
            _draw_cell(canvas, int(cls), float(cy), float(cx), r, rng)
    green = np.clip(10 + 235 * rng.uniform(0.75, 1.0) * canvas, 0, 255).astype(np.uint8)
    blur = ImageFilter.GaussianBlur(max(0.5, 0.8 * tile_size / 448))
    g = np.asarray(Image.fromarray(green).filter(blur), np.float32)
    g = g + rng.normal(0, 3.0, g.shape)
    rb = 0.04 * g[None] + rng.normal(0, 1.0, (2, h, w))
    rgb = np.stack([rb[0], g, rb[1]], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- public API
def generate_ana_demo(out_dir, *, n_train=40, n_val=12, n_test=12, tiles_x=2, tiles_y=2,
                      tile_size=448, num_classes=8, max_labels=3, seed=0) -> Path:
    """Writes out_dir/images/*.png and out_dir/annotations.csv; returns the CSV path.

    CSV columns: ``path`` (file name relative to out_dir/images), ``TARGET`` (sorted
    space-separated class indices), ``Split`` (train/val/test) and ``TILE_TARGETS`` (each
    tile's classes, row-major tile order, tiles separated by ``;``). Raises ValueError for
    arguments that cannot satisfy the contract (e.g. a split too small to hold every class).
    """
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
    if not 1 <= max_labels <= num_classes:
        raise ValueError(f"max_labels must be in 1..num_classes={num_classes}, got {max_labels}")
    if tiles_x < 1 or tiles_y < 1 or tile_size < 32:
        raise ValueError(f"need tiles_x, tiles_y >= 1 and tile_size >= 32, got "
                         f"{tiles_x}, {tiles_y}, {tile_size}")
    need = math.ceil(num_classes / max_labels)
    splits = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in splits.items():
        if n < need:
            raise ValueError(f"split {split!r} has {n} images but needs at least {need} = "
                             f"ceil(num_classes={num_classes} / max_labels={max_labels}) so "
                             f"that every class appears in it")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    plan_seed, *image_seeds = np.random.SeedSequence(seed).spawn(1 + sum(splits.values()))
    plan_rng = np.random.default_rng(plan_seed)
    rows = []
    for split, n in splits.items():
        for labels in _plan_labels(n, num_classes, max_labels, plan_rng):
            rng = np.random.default_rng(image_seeds[len(rows)])
            tile_sets = _plan_tiles(labels, tiles_x * tiles_y, rng)
            name = f"ana_{len(rows):04d}.png"
            img = _render(tile_sets, tiles_x, tiles_y, tile_size, rng)
            Image.fromarray(img, "RGB").save(out_dir / "images" / name, compress_level=1)
            rows.append({"path": name, "TARGET": " ".join(map(str, labels)), "Split": split,
                         "TILE_TARGETS": ";".join(" ".join(map(str, t)) for t in tile_sets)})
    csv_path = out_dir / "annotations.csv"
    pd.DataFrame(rows, columns=["path", "TARGET", "Split", "TILE_TARGETS"]).to_csv(
        csv_path, index=False)
    return csv_path
