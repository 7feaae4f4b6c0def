"""utils/precision.py and its use in the CryoEM step: no-ops on the CPU, autocast, loss scaling."""
import copy

import pytest
import torch

from models.fixmatch_pu import EMATeacher, FixMatchPUModel
from utils.cryoem.epoch import EpochSetup, StepParams, train_one_epoch
from utils.precision import Precision, configure_backends, make_precision, maybe_compile, memory_format

CPU = torch.device("cpu")


def test_cpu_defaults_are_no_ops():
    p = make_precision(CPU, enabled=True)
    assert not p.enabled and not p.scaler.is_enabled() and p.describe() == "float32"
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert memory_format(CPU, True) == torch.contiguous_format
    assert configure_backends(CPU) == "cpu"
    m = torch.nn.Linear(2, 2)
    assert maybe_compile(m, False) is m
    cpu_bf16 = make_precision(CPU, enabled=True, allow_cpu=True)
    assert cpu_bf16.dtype == torch.bfloat16 and not cpu_bf16.scaler.is_enabled()
    assert make_precision(CPU, enabled=False, allow_cpu=True).dtype is None


def _batches(n_batches=2, batch=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        x = torch.randn(batch, 1, size, size, generator=g)
        is_pos = torch.zeros(batch, dtype=torch.bool)
        is_pos[:2] = True
        x[is_pos] += 1.0
        out.append((x, is_pos, torch.arange(batch)))
    return out


def _run(precision, seed=0):
    torch.manual_seed(seed)
    student = FixMatchPUModel("resnet18", dropout=0.0)
    start = copy.deepcopy(student.state_dict())
    teacher = EMATeacher(student, decay=0.9)
    # plain SGD: its step is proportional to the gradient, so clipping scaled (not unscaled)
    # gradients would show up as a tiny update
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    params = StepParams(prior=0.3, rampup_epochs=0, entropy_start_epoch=0, grad_clip=1.0)
    setup = EpochSetup(student, teacher, _batches(), optimizer, scheduler, params, CPU, precision=precision)
    stats = train_one_epoch(setup, 1, generator=torch.Generator().manual_seed(1))
    delta = torch.sqrt(sum(((student.state_dict()[k].float() - v.float()) ** 2).sum()
                           for k, v in start.items() if v.is_floating_point()))
    return stats, float(delta)


def test_bf16_autocast_step_matches_float32():
    ref, ref_delta = _run(make_precision(CPU, enabled=False))
    bf16, bf16_delta = _run(make_precision(CPU, enabled=True, allow_cpu=True))
    assert abs(bf16["loss"] - ref["loss"]) < 0.05 * max(1.0, abs(ref["loss"]))
    assert 0.8 < bf16_delta / ref_delta < 1.25


def test_float16_loss_scaling_unscales_before_clipping():
    ref, ref_delta = _run(make_precision(CPU, enabled=False))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=True)
    fp16 = Precision(dtype=torch.float16, scaler=scaler, device_type="cpu")
    stats, delta = _run(fp16)
    assert scaler.get_scale() > 0 and stats["steps"] == 2
    assert abs(stats["loss"] - ref["loss"]) < 0.05 * max(1.0, abs(ref["loss"]))
    # the clipped update has the float32 size (clipping scaled gradients would shrink it ~4096x)
    assert 0.8 < delta / ref_delta < 1.25


def test_the_training_config_has_the_fast_path_keys():
    from utils.cryoem.config import default_config, validate_config
    from utils.errors import UserError
    cfg = default_config()
    assert (cfg["training"]["amp"], cfg["training"]["channels_last"], cfg["training"]["compile"],
            cfg["training"]["deterministic"]) == (True, True, False, False)
    cfg["training"]["amp"] = "yes"
    with pytest.raises(UserError, match="training.amp"):
        validate_config(cfg, source="x.yaml")
