"""The CryoEM patch classifier (grey ResNet + one-logit head) and its EMA teacher."""
import copy

import torch
from torch import nn

from models.backbones import build_resnet_trunk
from utils.errors import UserError


class FixMatchPUModel(nn.Module):
    """Particle classifier: ``logit = head(mean_{h,w} trunk(x))``, particle probability ``sigmoid(logit)``.

    - ``trunk``: a torchvision ResNet-18/34/50 up to ``layer4`` with a 1-channel ``conv1``
      (:func:`models.backbones.build_resnet_trunk`); ``[B, 1, S, S] -> [B, F, h, w]``.
    - average pool over ``h, w`` (with ``context > 0``: over the central features only, below),
    - ``head``: ``nn.Sequential(Dropout(dropout), Linear(F, 1))``.

    ``forward`` returns logits of shape ``[B]``. ``trunk`` and ``head`` stay separate attributes
    so that dense inference can run the trunk over a whole micrograph, pool feature-map windows
    and apply ``head`` to each (models/dense.py).

    ``context`` (pixels, a multiple of the trunk stride 32; default 0): the input patch is the
    classified window plus ``context`` pixels of real surroundings on every side, and only the
    features of the central window are pooled (the outer ``context / 32`` feature rows and
    columns are dropped). The trunk then computes the window's features from real pixels
    beyond the window's edge, as it does when it runs densely over a whole micrograph, so the
    dense map agrees with this classifier instead of with one that saw zero padding there.
    The deep layers pad their feature maps at the patch edge too, so the agreement needs two
    cells of the stride-32 map between window and edge: 64 px (``preprocess_cryoem.py``'s
    default; models/dense.py has the measurements).
    """

    def __init__(self, backbone="resnet18", dropout=0.0, pretrained=False, weights_file=None, context=0):
        super().__init__()
        if context < 0 or context % 32:
            raise ValueError(f"context must be a non-negative multiple of 32 px, got {context!r}")
        self.trunk, self.num_features = build_resnet_trunk(backbone, in_channels=1, pretrained=pretrained,
                                                           weights_file=weights_file)
        self.backbone = backbone
        self.context = int(context)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, 1))

    def forward(self, x):
        """Logits ``[B]`` for grey patches ``x`` of shape ``[B, 1, S, S]`` (``S`` includes the context)."""
        features = self.trunk(x)
        m = self.context // 32
        if m:
            if features.shape[-1] <= 2 * m or features.shape[-2] <= 2 * m:
                raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} patch leaves no window inside a context of "
                                 f"{self.context} px")
            features = features[:, :, m:-m, m:-m]
        return self.head(features.mean(dim=(2, 3))).squeeze(1)  # average pool -> [B, F] -> [B]


def unwrap_model(model):
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` (child ``module``) or a
    ``torch.compile`` wrapper (``_orig_mod``); any other module unchanged."""
    while True:
        children = model._modules
        if "module" in children and len(children) == 1:
            model = children["module"]
        elif "_orig_mod" in children and len(children) == 1:
            model = children["_orig_mod"]
        else:
            return model


class EMATeacher:
    """Mean teacher (Tarvainen & Valpola 2017) as used by FixMatch (Sohn et al. 2020).

    After each optimiser step, :meth:`update` sets for every parameter
    ``p_teacher = d_t * p_teacher + (1 - d_t) * p_student`` and copies every buffer (BatchNorm
    running statistics, ``num_batches_tracked``) from the student. ``d_t = min(decay,
    (1 + t) / (10 + t))`` at update ``t`` (0-based): the mean teacher's warm-up, so that the
    teacher forgets its random initialisation in the first hundreds of steps instead of the
    ~1 / (1 - 0.999) = 1000 steps of a constant decay (a short run would otherwise evaluate
    and pseudo-label with a nearly untrained teacher). ``d_t`` reaches 0.999 after ~9,000 steps.
    ``model`` is a deep copy of the student, in eval mode, with ``requires_grad`` off: it makes
    the pseudo-labels and is the model evaluated. Build the teacher after moving the student to
    its device. The student may be passed wrapped in ``DistributedDataParallel`` (the wrapped
    ``.module`` is used).

    ``enabled=False`` (config ``model.use_ema: false``): ``model`` is the student itself (its
    mode is the caller's) and :meth:`update` does nothing.
    """

    def __init__(self, student, decay=0.999, enabled=True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.enabled = bool(enabled)
        self.step = 0  # updates done so far (drives the warm-up of the decay)
        student = unwrap_model(student)
        if self.enabled:
            self.model = copy.deepcopy(student).eval()
            self.model.requires_grad_(False)
        else:
            self.model = student

    def current_decay(self):
        """The decay the next :meth:`update` uses: ``min(decay, (1 + t) / (10 + t))``."""
        return min(self.decay, (1.0 + self.step) / (10.0 + self.step))

    @torch.no_grad()
    def update(self, student):
        """One EMA step from ``student`` (a module, possibly DDP-wrapped): average params, copy buffers."""
        if not self.enabled:
            return
        student = unwrap_model(student)
        d = self.current_decay()
        self.step += 1
        t_params, s_params = dict(self.model.named_parameters()), dict(student.named_parameters())
        if t_params.keys() != s_params.keys():
            raise ValueError("EMATeacher.update: the student's parameters do not match the teacher's")
        # t + (1 - d) (s - t) = d t + (1 - d) s, for all parameters in a few fused kernels
        torch._foreach_lerp_(list(t_params.values()), [s_params[k].detach() for k in t_params], 1.0 - d)
        t_bufs, s_bufs = dict(self.model.named_buffers()), dict(student.named_buffers())
        if t_bufs.keys() != s_bufs.keys():
            raise ValueError("EMATeacher.update: the student's buffers do not match the teacher's")
        for name, t in t_bufs.items():
            t.copy_(s_bufs[name])

    def state_dict(self):
        """``{"model": teacher state_dict, "decay": float, "enabled": bool, "step": int}``.

        When disabled, ``model`` is the student's state (the teacher is the student).
        """
        return {"model": self.model.state_dict(), "decay": self.decay, "enabled": self.enabled, "step": self.step}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`'s output; a teacher saved with another ``enabled`` is a UserError."""
        if bool(state["enabled"]) != self.enabled:
            raise UserError(f"model.use_ema is {str(self.enabled).lower()} but the checkpoint's EMA teacher was "
                            f"saved with use_ema {str(bool(state['enabled'])).lower()}")
        self.decay = float(state["decay"])
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
