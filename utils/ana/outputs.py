"""The output files and log lines of an ANA run (main.py, main_single.py).

Run level:

- ``{epoch}_{metric}.pt`` (``--saveModel``): the best model per val metric, :func:`keep_best_models`;
- ``test_predictions.csv`` (and ``confusion_matrix.csv`` for single-label runs): the test images'
  probabilities of a new best model;
- TensorBoard scalars and output.txt's per-epoch weight line, :func:`log_epoch`.

Instance level: which tiles the weights and the model credit with a label.

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

from datasets.samplers import sampling_entropy
from models.sample_weights import weight_stats
from utils.checkpoint import save_checkpoint
from utils.io import atomic_write

MONTAGE_TILES = 8  # tiles per row of a class's PNG
# val metric key -> checkpoint file suffix of the reference code's README ({epoch}_f1mi.pt, ...)
BEST_METRICS = {"f1_mi": "f1mi", "f1_ma": "f1ma", "acc_total": "acc", "mAP": "mAP"}


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


def write_instances(run_dir, train, train_loader, setup, suffix=""):
    """``instance_weights{suffix}.csv`` and ``instance_tiles/class{k}{suffix}.png`` of the current
    weights (``setup``: the run's :class:`utils.ana.epoch.EpochSetup`)."""
    frame = write_instance_weights(run_dir / f"instance_weights{suffix}.csv", train, setup.weights.alpha,
                                   setup.targets)
    write_tile_montages(run_dir / "instance_tiles", frame, np.load(train_loader.dataset.cache_path, mmap_mode="r"),
                        suffix=suffix)


def write_predictions(path, tileset, probs, *, single_label):
    """``test_predictions.csv``: ``path``, ``target``, (``pred``,) ``prob_0`` ... per test image."""
    frame = pd.DataFrame({"path": tileset.bags["bag"].astype(str), "target": tileset.bags["TARGET"]})
    if single_label:
        frame["pred"] = probs.argmax(dim=1).numpy()
    for k in range(probs.shape[1]):
        frame[f"prob_{k}"] = probs[:, k].numpy()
    atomic_write(path, lambda f: frame.to_csv(f, index=False), mode="w")


def write_confusion(path, matrix):
    """``confusion_matrix.csv``: rows ``true_k``, columns ``pred_k`` (counts)."""
    n = len(matrix)
    frame = pd.DataFrame(matrix, index=[f"true_{k}" for k in range(n)], columns=[f"pred_{k}" for k in range(n)])
    atomic_write(path, lambda f: frame.to_csv(f, index_label="class"), mode="w")


def keep_best_models(model, improved, best_files, run_dir, epoch):
    """--saveModel: ``{epoch}_{metric}.pt`` for each improved metric, replacing that metric's older file."""
    for key in improved:
        name = f"{epoch}_{BEST_METRICS[key]}.pt"
        save_checkpoint(model.state_dict(), run_dir / name)
        old = best_files.get(key)
        if old and old != name and (run_dir / old).is_file():
            (run_dir / old).unlink()
        best_files[key] = name


class NullResults:
    """Stands in for results.json on the processes other than the main one."""

    def append(self, record):
        pass

    def truncate_after(self, epoch):
        pass


def log_scalars(writer, prefix, values, step):
    """TensorBoard ``prefix/key`` for every finite number of ``values``."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and value == value:
            writer.add_scalar(f"{prefix}/{key}", value, step)


def log_epoch(settings, writer, logger, setup, stats, val, epoch):
    """TensorBoard scalars of the epoch and output.txt's ``weights mean M dropped D`` line."""
    weights, tile_labels = setup.weights, setup.tile_labels
    wstats = weight_stats(weights.alpha, tile_labels)
    log_scalars(writer, "train", {k: stats[k] for k in ("loss", "images_per_s", "skipped_batches")}, epoch)
    writer.add_scalar("train/lr", setup.optimizer.param_groups[0]["lr"], epoch)
    writer.add_scalar("train/weight_lr", settings.weight_lr_used, epoch)
    log_scalars(writer, "val", val, epoch)
    log_scalars(writer, "weights", wstats, epoch)
    entropy = sampling_entropy(setup.sampler_probs) if settings.sampling else 1.0  # 1 = uniform (shuffling)
    writer.add_scalar("sampler/entropy", entropy, epoch)
    writer.add_histogram("weights/alpha", weights.alpha[tile_labels > 0] if weights.alpha.dim() == 2
                         else weights.alpha, epoch)
    logger.info(f"epoch {epoch} | weights mean {wstats['mean']:.4f} dropped {wstats['dropped_fraction']:.3f}"
                + (f" | sampler entropy {entropy:.3f}" if settings.sampling else ""))


def describe_weights(weights, settings):
    """Log line: how the weights are grouped for Adam and at which learning rates."""
    source = " (--lr)" if settings.weight_lr is None else ""
    if settings.weightOptimizer == "sgd" and not settings.weight_lr_given:
        source = " (the --weightOptimizer sgd default)"
    how = "Adam" if settings.weightOptimizer == "adam" else "gradient steps (--weightOptimizer sgd)"
    if settings.weightGroups == "one":
        return f"weights: {how}, one group, learning rate {settings.weight_lr_used:g}{source}"
    rates = ", ".join(f"{lr:g}" for lr in weights.group_lr.tolist())
    return (f"weights: {how}, {len(weights.group_lr)} groups of tiles with the same label "
            f"{'count' if settings.weightGroups == 'count' else 'set'}, learning rates {rates}{source}")
