"""The GPU fast path, shared by both families: mixed precision, channels-last, cuDNN autotuning,
optional ``torch.compile``.

Everything here is a no-op on the CPU (or when switched off), through objects rather than
branches in the training loops: ``precision.autocast()`` is a
``nullcontext`` and ``precision.scaler`` a disabled ``GradScaler`` whose ``scale``, ``unscale_``,
``step`` and ``update`` pass straight through.

* Mixed precision (on CUDA by default): bfloat16 where the GPU supports it (no loss scaling
  needed: same exponent range as float32), else float16 with a ``GradScaler``. Losses are
  computed from float32 logits (the callers cast), so the PU risk and the BCE stay exact.
* Channels-last memory format for the convolutional model and its inputs: cuDNN's fastest
  kernels for (b)float16 convolutions use NHWC.
* ``torch.backends.cudnn.benchmark`` (autotuned convolution algorithms) unless the run asks
  for deterministic results.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """``autocast()`` context factory, ``scaler`` (a possibly disabled GradScaler), and the dtype used."""
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    device_type: str

    @property
    def enabled(self):
        return self.dtype is not None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def describe(self):
        if self.dtype is None:
            return "float32"
        return str(self.dtype).replace("torch.", "") + (" + GradScaler" if self.scaler.is_enabled() else "")


def make_precision(device, enabled=True, allow_cpu=False):
    """Mixed precision for ``device``: bf16 on CUDA GPUs that support it, fp16 + GradScaler on
    older ones, float32 when ``enabled`` is false or on the CPU (``allow_cpu``: bf16 autocast on
    the CPU as well, for tests of this code path)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif enabled and allow_cpu and device.type == "cpu":
        dtype = torch.bfloat16
    else:
        dtype = None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Precision(dtype=dtype, scaler=scaler, device_type=device.type)


def configure_backends(device, deterministic=False):
    """cuDNN autotuning on CUDA unless ``deterministic``; returns what was set (for the log)."""
    if torch.device(device).type != "cuda":
        return "cpu"
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)
    return f"cudnn.benchmark={not deterministic}"


def memory_format(device, channels_last=True):
    """``torch.channels_last`` on CUDA when asked for, else ``torch.contiguous_format``."""
    return torch.channels_last if channels_last and torch.device(device).type == "cuda" else torch.contiguous_format


def maybe_compile(model, enabled):
    """``torch.compile(model)`` when ``enabled`` (the wrapper shares the parameters; checkpoints
    keep using the plain module, see ``models.fixmatch_pu.unwrap_model``)."""
    return torch.compile(model) if enabled else model
