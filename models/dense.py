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
* ``"dense"`` (default, SPEC_CRYOEM.md "Picking"): run the convolutional trunk once over the
  whole padded micrograph. A ResNet trunk has output stride ``S = 32``: feature ``i`` of the
  whole-image map and feature ``k`` of a patch that starts at input row ``i0 * S`` are
  computed by the same weights on input grids with the same alignment, so the patch's
  ``P/S x P/S`` feature block is (up to the border effect below) the window of the dense
  feature map starting at ``i0``. Average-pooling that map with a ``P/S`` kernel at stride 1
  and applying the linear head (after the pool, as in the classifier; dropout is off in eval)
  gives the classifier's logit for every patch whose corner is on the ``S`` grid. A map
  stride ``s < S`` (``S`` a multiple of ``s``) repeats this on the ``(S/s)^2`` shifted copies
  of the input (shift-and-stitch) and interleaves the results. Cost: ``(S/s)^2`` forward
  passes of the trunk over the micrograph, instead of one pass per patch.

Why the two can differ: in a crop, every convolution of the trunk pads ITS input with zeros
at the crop's edge (the image at the first layer, the feature maps deeper down); densely,
those positions hold real pixels and real features. A ResNet unit's receptive field is larger
than a patch, so a classifier trained on bare patches leans on that zero border, and its
dense map differs a lot (EMPIAR-10017, 64 px patches: correlation 0.57 with the crop map). A
model trained with ``context`` (pixels of real surroundings around the classified window,
see ``FixMatchPUModel``) pools only the window's features, and what matters is how many
cells of the LAST feature map (stride 32) lie between the window and the padded edge: the
3 x 3 convolutions of ``layer4`` carry the zero padding of that map one cell inwards per
convolution. Measured on EMPIAR-10017 with trained ResNet-18s (64 px window, a 2048 x 2048
test micrograph, map stride 32): context 32 (one cell) gives map correlation 0.77 and mean /
largest difference 0.049 / 0.66; context 64 (two cells) gives correlation 0.99 and 0.0065 /
0.28, and the same average precision for both maps (README, "Context and dense picking").
Blanking the outer context at training time does not help (tried): the gap comes from the
padded feature maps, not from the pixels beyond the context. With a trunk whose receptive
field stays inside its own block the two maps are equal to float precision (tested).
"""
import math

import torch
import torch.nn.functional as F

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


@torch.inference_mode()
def probability_map(model, image, patch_size, stride=32, mode="dense", batch_size=256,
                    trunk_stride=TRUNK_STRIDE):
    """Particle probabilities ``[ceil(h/stride), ceil(w/stride)]`` (float32, on the image's device).

    ``model`` is a :class:`models.fixmatch_pu.FixMatchPUModel` (``trunk`` + ``head``); it is
    used in eval mode and left in the mode it was in. ``image`` is ``[h, w]`` on the model's
    device. ``mode`` is ``"dense"`` or ``"crops"`` (see the module docstring); ``batch_size``
    is the number of crops per forward pass in ``"crops"`` mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if image.dim() != 2:
        raise ValueError(f"expected a 2-D image, got shape {tuple(image.shape)}")
    if mode == "dense":
        check_geometry(patch_size, stride, trunk_stride)
    was_training = model.training
    model.eval()
    try:
        fn = _dense_logits if mode == "dense" else _crop_logits
        logits = fn(model, image.float(), patch_size, stride, batch_size, trunk_stride)
    finally:
        model.train(was_training)
    return torch.sigmoid(logits.float())


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


def _crop_logits(model, image, patch_size, stride, batch_size, trunk_stride):
    padded, na, nb = _padded(image, patch_size, stride, extra=0)
    out = torch.empty(na, nb, device=image.device)
    for a in range(na):  # one map row of crops per step, batched
        strip = padded[:, :, a * stride:a * stride + patch_size, :]
        crops = F.unfold(strip, (patch_size, patch_size), stride=(1, stride))  # [1, P*P, nb]
        crops = crops[0].T.reshape(nb, 1, patch_size, patch_size)
        for i in range(0, nb, batch_size):
            out[a, i:i + batch_size] = model(crops[i:i + batch_size]).float()
    return out


def _dense_logits(model, image, patch_size, stride, batch_size, trunk_stride):
    # extra margin so that every shifted copy still holds whole trunk windows for all cells
    padded, na, nb = _padded(image, patch_size, stride, extra=trunk_stride)
    m = getattr(model, "context", 0) // trunk_stride  # feature rows of context on each side
    k = patch_size // trunk_stride - 2 * m  # the classified window's feature block is k x k
    if k < 1:
        raise ValueError(f"patch size {patch_size} leaves no window inside a context of {m * trunk_stride} px")
    r = trunk_stride // stride  # shifted copies per axis
    linear = model.head[-1]  # Dropout (identity in eval) then Linear(F, 1)
    out = torch.empty(na, nb, device=image.device)
    for dy in range(r):
        rows = range(dy, na, r)  # cells a = dy + r*i come from this shift
        if not len(rows):
            continue
        for dx in range(r):
            cols = range(dx, nb, r)
            if not len(cols):
                continue
            x = padded[:, :, dy * stride:, dx * stride:]
            feats = model.trunk(x)  # [1, F, ., .]
            # window mean of each k x k block; the block of the patch starting at feature i begins
            # at feature i + m (the context rows come first)
            pooled = F.avg_pool2d(feats, k, stride=1)[:, :, m:, m:]
            logits = torch.einsum("bchw,c->bhw", pooled.float(), linear.weight[0].float()) + linear.bias.float()
            out[dy::r, dx::r] = logits[0, :len(rows), :len(cols)]
    return out
