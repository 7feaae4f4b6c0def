"""Small figures rendered with Pillow (no plotting library needed), as uint8 RGB arrays.

They go to TensorBoard (``SummaryWriter.add_image(..., dataformats="HWC")``) or to PNG files.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils.io import atomic_write


def confusion_matrix_image(matrix, class_names=None, cell=48):
    """Render a confusion matrix (rows = true class, columns = predicted) as ``[H, W, 3]`` uint8.

    Each cell shows its count; its colour runs from white (0) to dark blue (the whole row),
    i.e. the row-normalised recall, so classes of different sizes stay comparable.
    """
    m = np.asarray(matrix, dtype=np.int64)
    n = m.shape[0]
    if m.ndim != 2 or m.shape[1] != n:
        raise ValueError(f"expected a square confusion matrix, got shape {m.shape}")
    names = [str(c) for c in (class_names if class_names is not None else range(n))]
    font = ImageFont.load_default()
    margin = 14 + 7 * max(len(s) for s in names)  # room for the row names
    top = 30
    img = Image.new("RGB", (margin + n * cell + 4, top + n * cell + 4), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, 2), "predicted ->", fill="black", font=font)
    draw.text((2, 2), "true", fill="black", font=font)
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    for j, name in enumerate(names):
        draw.text((margin + j * cell + 4, top - 14), name, fill="black", font=font)
    for i, name in enumerate(names):
        y0 = top + i * cell
        draw.text((4, y0 + cell // 2 - 6), name, fill="black", font=font)
        for j in range(n):
            x0 = margin + j * cell
            f = frac[i, j]
            colour = tuple(int(round(255 - f * (255 - c))) for c in (31, 78, 160))
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(200, 200, 200))
            draw.text((x0 + 6, y0 + cell // 2 - 6), str(m[i, j]), fill="white" if f > 0.5 else "black", font=font)
    return np.asarray(img)


# Line colours of pr_curve_image, in the order of the curves (repeated when there are more).
CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127))


def pr_curve_image(curves, title="", size=(480, 400)):
    """Render precision-recall curves as ``[H, W, 3]`` uint8 (``size`` = (W, H) pixels).

    ``curves`` maps a legend label to ``(recall, precision)`` sequences (same length, values in
    0..1; NaN points are skipped). Axes run 0..1 with gridlines every 0.1, recall along x and
    precision up y; each curve is a line in its own colour (a one-point curve is a dot), listed
    in a legend at the lower left (where PR curves rarely go). Curves are drawn in the order given.
    """
    img, draw, font, (left, top, plot_w, plot_h) = _canvas(size)
    width, height = size

    def to_px(r, p):
        return left + r * plot_w, top + (1 - p) * plot_h

    for i in range(11):
        v = i / 10
        x, _ = to_px(v, 0)
        _, y = to_px(0, v)
        grid = (225, 225, 225) if i not in (0, 10) else (0, 0, 0)
        draw.line([(x, top), (x, top + plot_h)], fill=grid)
        draw.line([(left, y), (left + plot_w, y)], fill=grid)
        if i % 2 == 0:
            draw.text((x - 8, top + plot_h + 4), f"{v:.1f}", fill="black", font=font)
            draw.text((left - 26, y - 6), f"{v:.1f}", fill="black", font=font)
    draw.text((left + plot_w // 2 - 18, height - 16), "recall", fill="black", font=font)
    draw.text((2, 4), "precision", fill="black", font=font)
    _title(draw, font, title, left, plot_w)

    for n, (label, (recall, precision)) in enumerate(curves.items()):
        colour = CURVE_COLOURS[n % len(CURVE_COLOURS)]
        r = np.asarray(recall, dtype=float).reshape(-1)
        p = np.asarray(precision, dtype=float).reshape(-1)
        if len(r) != len(p):
            raise ValueError(f"curve {label!r}: {len(r)} recall values but {len(p)} precision values")
        ok = np.isfinite(r) & np.isfinite(p)
        points = [to_px(float(a), float(b)) for a, b in zip(np.clip(r[ok], 0, 1), np.clip(p[ok], 0, 1))]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        elif points:
            draw.line(points, fill=colour, width=2)
    if curves:  # legend last, on white, so no curve hides it
        labels = [str(label) for label in curves]
        box_w = 34 + max(int(draw.textlength(s, font=font)) for s in labels)
        box_top = top + plot_h - 16 * len(labels) - 8
        draw.rectangle([left + 4, box_top, left + 4 + box_w, top + plot_h - 4], fill="white", outline=(160, 160, 160))
        for n, label in enumerate(labels):
            ly = box_top + 4 + 16 * n
            draw.rectangle([left + 10, ly + 3, left + 24, ly + 9], fill=CURVE_COLOURS[n % len(CURVE_COLOURS)])
            draw.text((left + 30, ly), label, fill="black", font=font)
    return np.asarray(img)


def save_png(path, image):
    """Write ``image`` (a Pillow image or a uint8 ``[H, W, 3]`` array) as a PNG, atomically."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def histogram_image(values, threshold=None, bins=50, title="", size=(480, 320)):
    """Render a histogram of ``values`` (scores in 0..1) as ``[H, W, 3]`` uint8, ``size`` = (W, H).

    ``bins`` equal bins over [0, 1]; bar heights on a square-root scale (so a long tail of low
    scores does not flatten the rest; the axis is labelled with counts); ``threshold`` (when
    given) is a red vertical line, and the bars at or above it are drawn in green.
    """
    img, draw, font, (left, top, plot_w, plot_h) = _canvas(size)
    width, height = size
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64).reshape(-1), bins=bins, range=(0.0, 1.0))
    peak = max(int(counts.max()), 1)
    scale = plot_h / np.sqrt(peak)
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        if n == 0:
            continue
        x0, x1 = left + lo * plot_w, left + hi * plot_w
        colour = (44, 160, 44) if threshold is not None and lo >= threshold else (150, 150, 150)
        draw.rectangle([x0, top + plot_h - np.sqrt(n) * scale, max(x0, x1 - 1), top + plot_h], fill=colour)
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    for i in range(0, 11, 2):
        x = left + i / 10 * plot_w
        draw.text((x - 8, top + plot_h + 4), f"{i / 10:.1f}", fill="black", font=font)
    for n in sorted({1, peak // 4, peak}):
        if n >= 1:
            y = top + plot_h - np.sqrt(n) * scale
            draw.text((2, y - 6), str(n), fill="black", font=font)
    draw.text((left + plot_w // 2 - 14, height - 16), "score", fill="black", font=font)
    if threshold is not None and np.isfinite(threshold):
        x = left + float(np.clip(threshold, 0, 1)) * plot_w
        draw.line([(x, top), (x, top + plot_h)], fill=(214, 39, 40), width=2)
    _title(draw, font, title, left, plot_w)
    return np.asarray(img)


def _canvas(size):
    """A white ``size`` = (W, H) image with its drawer, font and plot box ``(left, top, width, height)``
    inside the margins that hold the axis labels and the title."""
    width, height = size
    left, right, top, bottom = 44, 12, 28, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    if plot_w < 10 or plot_h < 10:
        raise ValueError(f"size {size} leaves no room for the plot")
    img = Image.new("RGB", (width, height), "white")
    return img, ImageDraw.Draw(img), ImageFont.load_default(), (left, top, plot_w, plot_h)


def _title(draw, font, title, left, plot_w):
    """The title centred above the plot box (nothing for an empty title)."""
    if title:
        title = str(title)
        draw.text((left + (plot_w - draw.textlength(title, font=font)) / 2, 4), title, fill="black", font=font)
