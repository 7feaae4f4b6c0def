"""torchvision ResNet classifiers with a replaced head, and offline-aware pretrained weights."""
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

from utils.errors import UserError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


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


def load_imagenet_state_dict(arch, weights_file=None):
    """ImageNet weights of ``arch`` from ``weights_file``, the torch hub cache, or a download.

    Offline machines cannot download: instead of hanging or printing a traceback, this raises
    a :class:`UserError` that says where the file was looked for and how to go on.
    """
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise UserError(f"--pretrainedWeights {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"--pretrainedWeights {path} cannot be read ({type(exc).__name__})") from None
        return state.get("state_dict", state) if isinstance(state, dict) else state
    weights = _imagenet_weights(arch)
    cached = _cached_weights_path(weights)
    if not cached.is_file() and not _can_reach(weights.url):
        raise UserError(
            f"ImageNet weights for {arch} are not in the torch hub cache ({cached}) and "
            f"{urlparse(weights.url).hostname} cannot be reached; pass --no-pretrained to start "
            f"from random initialisation, or --pretrainedWeights FILE (or copy the file to {cached})")
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
