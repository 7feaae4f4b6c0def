"""Dense inference: the patch classifier evaluated at every grid point of a whole micrograph.

Frame. ``image`` is a 2-D float tensor ``[h, w]`` (a micrograph after the preprocessing's
downsampling and normalisation). Map cell ``(a, b)`` is the classifier's probability for the
``P x P`` patch centred on image pixel ``(row, col) = (a * s, b * s)``, where ``P`` is the
patch size (the classifier's input, context included: see ``FixMatchPUModel.context``) and
``s`` the map stride: the patch covers rows ``a*s - P/2 .. a*s + P/2 - 1``
(the same convention as the positive patches written by ``datasets/cryoem_preprocess.py``).
The map has ``ceil(h / s) x ceil(w / s)`` cells, so every pixel is within ``s / 2`` of a
cell centre; pixels outside the image read as 0, the mean of a z-scored micrograph.

Two ways to compute it:

* ``"crops"``: the reference. Cut every patch out (batched with ``unfold``, one map row
  at a time) and run the whole classifier on it, exactly as on a training patch.
* ``"dense"`` (default, README "Context and dense picking"): run the convolutional trunk once over the
  whole padded micrograph. A ResNet trunk has output stride ``S = 32``: feature ``i`` of the
  whole-image map and feature ``k`` of a patch that starts at input row ``i0 * S`` are
  computed by the same weights on input grids with the same alignment, so the patch's
  ``P/S x P/S`` feature block is (up to the border effect below) the window of the dense
  feature map starting at ``i0``. Average-pooling that map with a ``P/S`` kernel at stride 1
  and applying the linear head (after the pool, as in the classifier; dropout is off in eval)
  gives the classifier's logit for every patch whose corner is on the ``S`` grid. A map
  stride ``s < S`` (``S`` a multiple of ``s``) repeats this on the ``(S/s)^2`` shifted copies
  of the input (shift-and-stitch) and interleaves the results. Cost: ``(S/s)^2`` forward
  passes of the trunk over the micrograph, instead of one pass per patch. For ``s <= 16`` a ResNet
  runs as :func:`dilated_trunk` instead (``layer4`` at stride 1, dilated by 2, as DeepLab does):
  output stride 16, so the stride-16 map takes one pass (the same map, to float rounding; tested)
  and stride 8 four.

Tiles. Densely, the trunk's activations grow with the micrograph (a 4096 x 4096 image at
ResNet-18's first layer alone is 64 x 2048 x 2048 floats, 1 GiB). With ``max_tile`` the trunk runs
on overlapping tiles of at most ``max_tile`` px per side instead, each extended by the trunk's
receptive field (:func:`trunk_reach`) beyond the cells it delivers, and starting on the trunk's
stride grid; a tile edge inside the micrograph then never reaches a delivered feature, and at
the micrograph's own edges the tile ends where the whole image does, so each delivered value is
computed from exactly the inputs (and zero paddings) of the untiled pass: the stitched map is the
untiled map (to float rounding; tested), and peaks are found once on the stitched map, so no pick
doubles at a seam.

Why the two can differ: in a crop, every convolution of the trunk pads ITS input with zeros
at the crop's edge (the image at the first layer, the feature maps deeper down); densely,
those positions hold real pixels and real features. A ResNet unit's receptive field is larger
than a patch, so a classifier trained on bare patches leans on that zero border, and its
dense map differs a lot from its crop map (figures: benchmarks/README.md, "Context and dense
picking"). A model trained with ``context`` (pixels of real surroundings around the classified window,
see ``FixMatchPUModel``) pools only the window's features, and what matters is how many
cells of the LAST feature map (stride 32) lie between the window and the padded edge: the
3 x 3 convolutions of ``layer4`` carry the zero padding of that map one cell inwards per
convolution. On EMPIAR-10017 with trained ResNet-18s (64 px window) one cell of context (32 px)
leaves the maps far apart, two cells (64 px) make them agree to about 0.01 with the same average
precision (benchmarks/README.md, "Context and dense picking"; README, "Context and dense picking").
Blanking the outer context at training time does not help (tried): the gap comes from the
padded feature maps, not from the pixels beyond the context. With a trunk whose receptive
field stays inside its own block the two maps are equal to float precision (tested).
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

TRUNK_STRIDE = 32  # output stride of a torchvision ResNet trunk (conv1, maxpool, layer2..4)
MODES = ("dense", "crops")
DENSE_CONTEXT = 64  # px of context (two cells of the stride-32 map) for dense = crops (see above)


def map_shape(h, w, stride):
    """Shape of the probability map for an ``h x w`` image at map stride ``stride``."""
    return math.ceil(h / stride), math.ceil(w / stride)


def check_geometry(patch_size, stride, trunk_stride=TRUNK_STRIDE):
    """Raise ``ValueError`` unless dense inference can reproduce the patch classifier."""
    if patch_size % trunk_stride:
        raise ValueError(f"dense inference needs a patch size divisible by the trunk stride {trunk_stride}, "
                         f"got {patch_size} (use mode 'crops')")
    if stride < 1 or trunk_stride % stride:
        raise ValueError(f"the map stride must divide the trunk stride {trunk_stride}, got {stride}")


def trunk_reach(trunk):
    """``(J, lo, hi)``: feature ``o`` of ``trunk``'s output depends on input pixels
    ``J*o + lo .. J*o + hi`` only (its receptive field, zero padding included), per axis.

    Composed from the convolutions and pooling layers in registration order, which is the order
    a torchvision ResNet runs them; a residual block's ``downsample`` shortcut sees a subset of its
    main path's inputs and is skipped. ``J`` is the trunk's output stride.
    """
    J, lo, hi = 1, 0, 0
    for name, module in trunk.named_modules():
        if "downsample" in name.split(".") or not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        k, s, p, d = (module.kernel_size, module.stride, module.padding, getattr(module, "dilation", 1))
        k, s, p, d = (v[0] if isinstance(v, tuple) else v for v in (k, s, p, d))
        if isinstance(p, str):
            raise ValueError(f"{name}: padding {p!r} is not supported by trunk_reach")
        lo, hi, J = lo - J * p, hi + J * (d * (k - 1) - p), J * s
    return J, lo, hi


def dilated_trunk(trunk):
    """A view of a torchvision ResNet ``trunk`` whose last stage (``layer4``) runs at stride 1 with its
    later 3 x 3 convolutions dilated by 2 (DeepLab's "atrous" trunk), sharing ``trunk``'s parameters
    and buffers; None when ``trunk`` has no ``layer4``.

    Its output stride is 16 instead of 32, and its feature ``2 o`` is exactly feature ``o`` of
    ``trunk`` (a stride-2 convolution's output is the stride-1 output at the even positions, and a
    dilation of 2 reads exactly those): the odd features are those ``trunk`` computes on the input
    shifted by 16 px, up to the zero padding at the input's own edges. One pass of this trunk thus
    gives the stride-16 map for which shift-and-stitch needs four passes of ``trunk``, for about 40%
    of their work (ResNet-18: the stem to layer3 once, layer4 on 4x the positions).
    """
    if not hasattr(trunk, "layer4"):
        return None
    shared = {id(t): t for t in [*trunk.parameters(), *trunk.buffers()]}
    view = copy.deepcopy(trunk, shared)
    strided = False
    for conv in view.layer4.modules():  # registration order = execution order in a torchvision block
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.stride != (1, 1):  # the stage's stride-2 convolution and its 1 x 1 shortcut
            conv.stride = (1, 1)
            strided = True
        elif strided and conv.kernel_size != (1, 1):
            conv.dilation = (2, 2)
            conv.padding = (conv.kernel_size[0] - 1, conv.kernel_size[1] - 1)
    return view


def tile_spans(n_cells, length, patch_size, context, max_tile, reach, trunk_stride=TRUNK_STRIDE):
    """Split ``n_cells`` map cells of one axis into tiles: a list of ``(c0, c1, a, b)``, cells
    ``c0 <= i < c1`` computed from the input span ``a <= x < b`` (of ``length`` px).

    ``reach = (J, lo, hi)`` of the trunk that runs (:func:`trunk_reach`): feature ``o`` needs inputs
    ``J*o + lo .. J*o + hi``, and one cell per ``J`` px. The classified window is ``k`` cells of
    ``trunk_stride`` px after ``m`` context cells; on the trunk's own grid (``g = trunk_stride / J``
    features per cell: 2 for :func:`dilated_trunk`) cell ``i`` pools features ``i + g*m + g*j``,
    ``j < k``. ``a`` is on the ``J`` grid, and a span that would pass an end of the image stops at
    it. One tile when ``max_tile`` is None or the whole axis fits.
    """
    if max_tile is None or length <= max_tile:
        return [(0, n_cells, 0, length)]
    J, lo, hi = reach
    if J < 1 or trunk_stride % J:
        raise ValueError(f"the trunk's stride is {J}, expected a divisor of {trunk_stride}")
    g = trunk_stride // J
    m = context // trunk_stride
    k = patch_size // trunk_stride - 2 * m
    first, extent = g * m, g * (k - 1)  # the first pooled feature after the cell's own, and the pooled span

    def span(c0, c1):
        a = max(0, (J * (c0 + first) + lo) // J * J)
        return a, min(length, J * (c1 - 1 + first + extent) + hi + 1)

    # the most cells per tile whose span (with its alignment slack) fits in max_tile
    per_tile = (max_tile - (hi - lo + 1) - (J - 1)) // J - extent + 1
    if per_tile < 1:
        need = (hi - lo + 1) + (J - 1) + extent * J
        raise ValueError(f"a tile of {max_tile} px cannot hold one map cell of this model with its receptive "
                         f"field; use at least {need} px")
    n_tiles = math.ceil(n_cells / per_tile)
    size = math.ceil(n_cells / n_tiles)
    return [(c0, min(n_cells, c0 + size), *span(c0, min(n_cells, c0 + size))) for c0 in range(0, n_cells, size)]


def symmetric_average(map_fn, image, stride):
    """Test-time augmentation: the mean of ``map_fn``'s probability maps over the 8 rotations and flips
    of the square grid (the dihedral group D4), each turned back, ``[ceil(h/stride), ceil(w/stride)]``.

    A micrograph has no preferred orientation, so the 8 are equally valid views of it. The image is
    first padded with zeros (the mean of a z-scored micrograph; the dense map reads zeros beyond the
    edge anyway) to ``H x W`` with ``H - 1`` and ``W - 1`` multiples of ``stride``: the transforms
    then move map cells onto map cells, and the averaged map is exactly equivariant (the map of a
    rotated image is the rotated map).
    """
    h, w = image.shape
    H, W = (stride * math.ceil((n - 1) / stride) + 1 for n in (h, w))
    x = F.pad(image, (0, W - w, 0, H - h))
    total = None
    for turns in range(4):
        for flip in (False, True):
            view = torch.rot90(x, turns, (0, 1))
            view = view.flip(1) if flip else view
            prob = map_fn(view)
            prob = prob.flip(1) if flip else prob
            prob = torch.rot90(prob, -turns, (0, 1))
            total = prob if total is None else total + prob
    na, nb = map_shape(h, w, stride)
    return (total / 8)[:na, :nb].contiguous()


@torch.inference_mode()
def probability_map(model, image, patch_size, stride=32, mode="dense", batch_size=256, *,
                    trunk_stride=TRUNK_STRIDE, max_tile=None, dilate=True, tta=False):
    """Particle probabilities ``[ceil(h/stride), ceil(w/stride)]`` (float32, on the image's device).

    ``model`` is a :class:`models.fixmatch_pu.FixMatchPUModel` (``trunk`` + ``head``); it is
    used in eval mode and left in the mode it was in. ``image`` is ``[h, w]`` on the model's
    device. ``mode`` is ``"dense"`` or ``"crops"`` (see the module docstring); ``batch_size``
    is the number of crops per forward pass in ``"crops"`` mode; ``max_tile`` (dense mode; px per
    side, None = the whole image at once) bounds the trunk's input and so its memory. ``dilate``
    (dense mode, a map stride below the trunk's): run a ResNet's :func:`dilated_trunk`, the same map
    as shift-and-stitch of the plain trunk for about 40% of the work at stride 16; ``tta``: average
    the maps of the 8 rotations and flips (:func:`symmetric_average`, 8x the work).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if image.dim() != 2:
        raise ValueError(f"expected a 2-D image, got shape {tuple(image.shape)}")
    if mode == "dense":
        check_geometry(patch_size, stride, trunk_stride)
    was_training = model.training
    model.eval()

    def one_map(img):
        if mode == "dense":
            logits = _dense_logits(model, img, patch_size, stride, trunk_stride, max_tile, dilate)
        else:
            logits = _crop_logits(model, img, patch_size, stride, batch_size)
        return torch.sigmoid(logits.float())

    try:
        return symmetric_average(one_map, image.float(), stride) if tta else one_map(image.float())
    finally:
        model.train(was_training)


def _padded(image, patch_size, stride, extra):
    """The image with ``P/2`` zeros above/left and enough below/right for every map cell.

    Crop ``(a, b)`` then starts at padded pixel ``(a*s, b*s)``.
    """
    h, w = image.shape
    na, nb = map_shape(h, w, stride)
    half = patch_size // 2
    bottom = (na - 1) * stride + patch_size + extra - half - h
    right = (nb - 1) * stride + patch_size + extra - half - w
    return F.pad(image[None, None], (half, right, half, bottom)), na, nb


def _crop_logits(model, image, patch_size, stride, batch_size):
    padded, na, nb = _padded(image, patch_size, stride, extra=0)
    out = torch.empty(na, nb, device=image.device)
    for a in range(na):  # one map row of crops per step, batched
        strip = padded[:, :, a * stride:a * stride + patch_size, :]
        crops = F.unfold(strip, (patch_size, patch_size), stride=(1, stride))  # [1, P*P, nb]
        crops = crops[0].T.reshape(nb, 1, patch_size, patch_size)
        for i in range(0, nb, batch_size):
            out[a, i:i + batch_size] = model(crops[i:i + batch_size]).float()
    return out


def _dense_logits(model, image, patch_size, stride, trunk_stride, max_tile=None, dilate=True):
    trunk, T = model.trunk, trunk_stride
    if dilate and stride < trunk_stride:
        view = dilated_trunk(model.trunk)
        if view is not None:
            trunk, T = view, trunk_stride // 2
    # extra margin so that every shifted copy still holds whole trunk windows for all cells
    padded, na, nb = _padded(image, patch_size, stride, extra=trunk_stride)
    context = getattr(model, "context", 0)
    m = context // trunk_stride  # window cells of context on each side
    k = patch_size // trunk_stride - 2 * m  # the classified window's feature block is k x k cells
    if k < 1:
        raise ValueError(f"patch size {patch_size} leaves no window inside a context of {m * trunk_stride} px")
    g = trunk_stride // T  # trunk features per window cell: 1, or 2 for the dilated trunk
    r = max(1, T // stride)  # shifted copies per axis
    reach = trunk_reach(trunk) if max_tile is not None else None
    linear = model.head[-1]  # Dropout (identity in eval) then Linear(F, 1)
    weight, bias = linear.weight[0].float(), linear.bias.float()
    # the head is linear, so the window mean of the features then the head = the window mean of the
    # head's per-feature logits: pool one channel instead of F
    kernel = torch.full((1, 1, k, k), 1.0 / (k * k), device=image.device)
    out = torch.empty(na, nb, device=image.device)
    for dy in range(r):
        rows = len(range(dy, na, r))  # cells a = dy + r*i come from this shift
        for dx in range(r):
            cols = len(range(dx, nb, r))
            if not rows or not cols:
                continue
            x = padded[:, :, dy * stride:, dx * stride:]
            block = out[dy::r, dx::r]
            for i0, i1, ya, yb in tile_spans(rows, x.shape[-2], patch_size, context, max_tile, reach, trunk_stride):
                for j0, j1, xa, xb in tile_spans(cols, x.shape[-1], patch_size, context, max_tile, reach,
                                                 trunk_stride):
                    feats = trunk(x[:, :, ya:yb, xa:xb])  # [1, F, ., .]
                    z = torch.einsum("bchw,c->bhw", feats.float(), weight)[:, None]
                    # window mean of each k x k block (every g-th feature); the block of the patch
                    # starting at feature i begins at feature i + g*m (the context cells come first);
                    # this tile's feature 0 is the whole copy's feature ya / T
                    pooled = F.conv2d(z, kernel, dilation=g)[0, 0]
                    fy, fx = i0 + g * m - ya // T, j0 + g * m - xa // T
                    block[i0:i1, j0:j1] = pooled[fy:fy + i1 - i0, fx:fx + j1 - j0] + bias
    return out
