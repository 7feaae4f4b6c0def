"""Instance-level outputs of an ANA run: which tiles the weights and the model credit with a label.

- ``instance_weights.csv``: one row per positive (training tile, class) pair, with the weight
  in use (``ReLU(alpha)``), the image's labels and the last target the pair was trained with;
- ``instance_tiles/class{k}.png``: per class, the highest- and the lowest-weighted training
  tiles of images with more than one label (top row: highest, bottom row: lowest);
- ``test_tile_predictions.csv``: per test tile, its position and the model's probabilities.

Every file is written atomically (``utils.io.atomic_write``).
"""
import io

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from utils.io import atomic_write

MONTAGE_TILES = 8  # tiles per row of a class's PNG


def _tile_frame(tileset):
    """Per tile: its image (``path``, as the CSV names it, or the bag), index within the image and box."""
    bag = tileset.tile_bag.numpy()
    tile_in_bag = pd.Series(bag).groupby(bag).cumcount().to_numpy()
    return pd.DataFrame({"path": tileset.bags["bag"].astype(str).to_numpy()[bag], "tile": tile_in_bag,
                         "left": tileset.boxes[:, 0], "top": tileset.boxes[:, 1]})


def _weights_in_use(alpha, tile_labels):
    """``ReLU(alpha)`` as a [T, C] matrix (a tile's weight repeated over its classes at sample granularity)."""
    a = torch.relu(alpha.detach().float().cpu().nan_to_num(0.0))
    return a[:, None].expand(tile_labels.shape) if a.dim() == 1 else a


def instance_weight_frame(tileset, alpha, targets):
    """One row per positive (tile, class) pair of the training split: ``path``, ``tile``, ``left``,
    ``top``, ``class``, ``weight`` (in use), ``bag_labels`` (the image's TARGET), ``target``.
    The frame's index is the tile's index in the split."""
    labels = tileset.tile_labels.cpu() > 0
    weights = _weights_in_use(alpha, labels)
    tile, cls = labels.nonzero(as_tuple=True)
    frame = _tile_frame(tileset).iloc[tile.numpy()]
    frame["class"] = cls.numpy()
    frame["weight"] = weights[tile, cls].numpy()
    frame["bag_labels"] = tileset.bags["TARGET"].astype(str).to_numpy()[tileset.tile_bag[tile].numpy()]
    frame["target"] = targets.detach().float().cpu()[tile, cls].numpy()
    return frame


def write_instance_weights(path, tileset, alpha, targets):
    frame = instance_weight_frame(tileset, alpha, targets)
    atomic_write(path, lambda f: frame.to_csv(f, index=False), mode="w")
    return frame


def write_tile_predictions(path, tileset, probs):
    """``test_tile_predictions.csv``: ``path``, ``tile``, ``left``, ``top``, ``prob_0`` ... per test tile."""
    frame = _tile_frame(tileset)
    for k in range(probs.shape[1]):
        frame[f"prob_{k}"] = probs[:, k].numpy()
    atomic_write(path, lambda f: frame.to_csv(f, index=False), mode="w")


def _montage(tiles, captions, size):
    """Two rows of tiles (``tiles[0]`` highest, ``tiles[1]`` lowest) with their weights written below."""
    n = max(len(row) for row in tiles)
    pad, text_h = 2, 12
    canvas = Image.new("RGB", (n * (size + pad) + pad, 2 * (size + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row, caps) in enumerate(zip(tiles, captions)):
        y = pad + r * (size + text_h + pad)
        for c, (tile, cap) in enumerate(zip(row, caps)):
            x = pad + c * (size + pad)
            canvas.paste(Image.fromarray(np.asarray(tile)), (x, y))
            draw.text((x + 1, y + size), cap, fill=(0, 0, 0))
    return canvas


def write_tile_montages(folder, frame, tile_cache, suffix=""):
    """``folder/class{k}{suffix}.png`` per class with pairs in images of >= 2 labels: the
    ``MONTAGE_TILES`` highest-weighted tiles (top row) and lowest-weighted (bottom row).
    ``frame`` is :func:`instance_weight_frame`'s (indexed by tile), ``tile_cache`` the split's
    ``[T, N, N, 3]`` uint8 tiles. Returns the paths written."""
    multi = frame[frame["bag_labels"].str.split().map(len) > 1]
    written = []
    for cls, pairs in multi.groupby("class"):
        order = pairs.sort_values("weight", ascending=False, kind="stable")
        k = min(MONTAGE_TILES, (len(order) + 1) // 2)
        rows = [order.iloc[:k], order.iloc[::-1].iloc[:k]]
        tiles = [[tile_cache[i] for i in row.index] for row in rows]
        captions = [[f"{w:.2f}" for w in row["weight"]] for row in rows]
        image = _montage(tiles, captions, tile_cache.shape[1])
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        path = folder / f"class{int(cls)}{suffix}.png"
        atomic_write(path, lambda f: f.write(buf.getvalue()))
        written.append(path)
    return written

