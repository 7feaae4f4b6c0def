"""torchvision ResNet classifiers with a replaced head, ResNet trunks, and offline-aware pretrained weights."""
import os
import socket
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

from utils.checkpoint import load_checkpoint
from utils.errors import UserError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
TRUNK_RESNETS = ("resnet18", "resnet34", "resnet50")  # the CryoEM backbones (config model.backbone)
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _imagenet_weights(arch):
    """torchvision's ImageNet weights enum entry for ``arch`` (V1: what ``pretrained=True`` gave)."""
    enum = torchvision.models.get_model_weights(arch)
    return enum.IMAGENET1K_V1


def _cached_weights_path(weights):
    """Where ``torch.hub`` keeps (or would keep) the weight file of ``weights``."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _can_reach(url, timeout=3.0):
    """True when a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_imagenet_state_dict(arch, weights_file=None, weights_flag="--pretrainedWeights",
                             disable_hint="pass --no-pretrained"):
    """ImageNet weights of ``arch`` from ``weights_file``, the torch hub cache, or a download.

    Offline machines cannot download: instead of hanging or printing a traceback, this raises
    a :class:`UserError` that says where the file was looked for and how to go on.
    ``weights_flag`` names the option that gave ``weights_file`` and ``disable_hint`` says how
    to turn pretraining off, in the caller's terms (the defaults are the ANA CLI's).
    """
    if weights_file is not None:
        # a ResNet state_dict (ImageNet's, or an ANA best-model file to start from); the other
        # kinds of checkpoint (run states, CryoEM models, data) are named in the error
        state = load_checkpoint(weights_file, expected=("imagenet", "ana-model"), flag=weights_flag)
        return state.get("state_dict", state)
    weights = _imagenet_weights(arch)
    cached = _cached_weights_path(weights)
    if not cached.is_file() and not _can_reach(weights.url):
        raise UserError(
            f"ImageNet weights for {arch} are not in the torch hub cache ({cached}) and "
            f"{urlparse(weights.url).hostname} cannot be reached; {disable_hint} to start "
            f"from random initialisation, or {weights_flag} FILE (or copy the file to {cached})")
    return weights.get_state_dict(progress=False)


def build_resnet_classifier(arch, num_classes, pretrained=False, weights_file=None):
    """A torchvision ResNet whose ``fc`` is ``Linear(features, num_classes)`` (one logit per class).

    The model's ``state_dict`` is therefore loadable into ``torchvision.models.<arch>()`` with
    the same replaced ``fc``, which is the checkpoint format the ANA README promises.
    """
    if arch not in RESNETS:
        raise UserError(f"--arch {arch!r} is not supported (expected one of {', '.join(RESNETS)})")
    model = torchvision.models.get_model(arch, weights=None)
    if pretrained:
        state = load_imagenet_state_dict(arch, weights_file)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) - {"fc.weight", "fc.bias"} or unexpected:
            raise UserError(f"pretrained weights do not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


def _adapt_stem_weight(weight, in_channels, arch):
    """A pretrained ``conv1`` kernel [O, C, k, k] made to take ``in_channels`` inputs.

    Grey input (``in_channels == 1``) from an RGB kernel: ``W_grey = sum_c W_rgb[:, c]``, so a
    grey image x gives the same response as the RGB image (x, x, x) gave (the usual adaptation,
    e.g. timm's ``adapt_input_conv``). A kernel that already has ``in_channels`` inputs is kept.
    """
    if weight.ndim != 4:
        raise UserError(f"pretrained weights for {arch}: conv1.weight has shape {tuple(weight.shape)}, expected 4 dims")
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise UserError(f"pretrained weights for {arch}: conv1.weight takes {weight.shape[1]} input channels, "
                    f"cannot adapt it to {in_channels}")


def build_resnet_trunk(arch, in_channels=3, pretrained=False, weights_file=None,
                       weights_flag="pretrained weights file", disable_hint="set model.pretrained to false"):
    """The convolutional trunk of a torchvision ResNet and its feature count: ``(trunk, F)``.

    ``trunk`` is an ``nn.Sequential`` of ``conv1, bn1, relu, maxpool, layer1..layer4`` (the
    ResNet without ``avgpool`` and ``fc``, child names and so ``state_dict`` keys as in
    torchvision); it maps ``[B, in_channels, H, W]`` to a feature map ``[B, F, H/32, W/32]``
    (rounded up), F = 512 for resnet18/34 and 2048 for resnet50. Being fully convolutional, it
    can also run densely over a whole micrograph.

    ``in_channels != 3`` replaces ``conv1`` by a conv with that many inputs (same kernel,
    stride, padding, no bias). With ``pretrained`` the ImageNet weights (``weights_file``, else
    the torch hub cache, else a download; see :func:`load_imagenet_state_dict`) are loaded and a
    grey stem gets the sum of the RGB kernels over the input channels. ``arch`` outside
    :data:`TRUNK_RESNETS` is a :class:`UserError` naming ``model.backbone``.
    """
    if arch not in TRUNK_RESNETS:
        raise UserError(f"model.backbone {arch!r} is not supported (expected one of {', '.join(TRUNK_RESNETS)})")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    net = torchvision.models.get_model(arch, weights=None)
    num_features = net.fc.in_features
    stem_weight = None
    if pretrained:
        state = load_imagenet_state_dict(arch, weights_file, weights_flag, disable_hint)
        if not isinstance(state, dict) or "conv1.weight" not in state:
            raise UserError(f"pretrained weights for {arch} hold no conv1.weight (not a torchvision ResNet state_dict)")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        stem_weight = _adapt_stem_weight(state.pop("conv1.weight"), in_channels, arch)
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a tensor of the wrong shape: weights of another architecture
            first = str(exc).strip().splitlines()[-1].strip()
            raise UserError(f"pretrained weights do not fit {arch}: {first}") from None
        missing = [k for k in missing if k not in ("conv1.weight", "fc.weight", "fc.bias")]
        if missing or unexpected:
            raise UserError(f"pretrained weights do not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if in_channels != net.conv1.in_channels:
        old = net.conv1
        net.conv1 = torch.nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,
                                    stride=old.stride, padding=old.padding, bias=False)
    if stem_weight is not None:
        if stem_weight.shape != net.conv1.weight.shape:
            raise UserError(f"pretrained weights do not fit {arch}: conv1.weight has shape "
                            f"{tuple(stem_weight.shape)}, expected {tuple(net.conv1.weight.shape)}")
        with torch.no_grad():
            net.conv1.weight.copy_(stem_weight)
    trunk = torch.nn.Sequential(OrderedDict((name, getattr(net, name)) for name in TRUNK_LAYERS))
    return trunk, num_features
