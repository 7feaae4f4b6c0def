"""Small figures rendered with Pillow (no plotting library needed), as uint8 RGB arrays.

They go to TensorBoard (``SummaryWriter.add_image(..., dataformats="HWC")``) or to PNG files.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont


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
