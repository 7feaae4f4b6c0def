"""FixMatchPUModel, its grey ResNet trunk and the EMA teacher."""
import io

import pytest
import torch
import torchvision
from torch import nn

from models.backbones import build_resnet_classifier, build_resnet_trunk
from models.fixmatch_pu import EMATeacher, FixMatchPUModel, unwrap_model
from utils.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny CPU forwards: one thread avoids OpenMP spin-waits (seconds per forward on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- trunk / model
@pytest.mark.parametrize("size", [32, 64])
def test_model_gives_one_logit_per_grey_patch(size):
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", dropout=0.2).eval()
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        logits = model(x)
        fmap = model.trunk(x)
    assert logits.shape == (3,)
    assert fmap.shape == (3, 512, size // 32, size // 32)
    # forward = head(global average pool of the trunk's feature map): what dense inference relies on
    torch.testing.assert_close(logits, model.head(fmap.mean(dim=(2, 3)))[:, 0])
    assert model(x[:1]).shape == (1,)  # a batch of one stays [1]


def test_trunk_layers_and_feature_counts():
    trunk, features = build_resnet_trunk("resnet18", in_channels=1)
    assert [name for name, _ in trunk.named_children()] == ["conv1", "bn1", "relu", "maxpool",
                                                             "layer1", "layer2", "layer3", "layer4"]
    assert features == 512 and trunk.conv1.in_channels == 1 and trunk.conv1.bias is None
    assert trunk.conv1.kernel_size == (7, 7) and trunk.conv1.stride == (2, 2)
    assert build_resnet_trunk("resnet50")[1] == 2048
    assert FixMatchPUModel("resnet34").num_features == 512


def test_dropout_is_active_in_train_mode_only():
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", dropout=0.5)
    assert isinstance(model.head[0], nn.Dropout) and model.head[0].p == 0.5
    assert isinstance(model.head[1], nn.Linear) and model.head[1].out_features == 1
    x = torch.randn(4, 1, 32, 32)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # batch statistics are the same; dropout is not
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    plain = FixMatchPUModel("resnet18", dropout=0.0).train()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))


@pytest.fixture
def fake_imagenet_weights(tmp_path):
    """A torchvision resnet18 state_dict with random weights and BN statistics, saved like the hub file."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18_fake.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_pretrained_grey_stem_is_the_sum_of_the_rgb_kernels(fake_imagenet_weights):
    path, state = fake_imagenet_weights
    model = FixMatchPUModel("resnet18", pretrained=True, weights_file=path)
    rgb = state["conv1.weight"]
    assert rgb.shape[1] == 3
    torch.testing.assert_close(model.trunk.conv1.weight.detach(), rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3])
    for key in ("layer4.1.conv2.weight", "layer2.0.downsample.1.running_var", "bn1.bias"):
        assert torch.equal(model.trunk.state_dict()[key], state[key])
    # the grey stem on x answers as the RGB stem did on (x, x, x)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model.trunk.conv1(x), nn.functional.conv2d(x.expand(-1, 3, -1, -1), rgb,
                                                                          stride=2, padding=3))


def test_pretrained_rgb_trunk_keeps_the_kernels(fake_imagenet_weights):
    path, state = fake_imagenet_weights
    trunk, _ = build_resnet_trunk("resnet18", in_channels=3, pretrained=True, weights_file=path)
    assert torch.equal(trunk.conv1.weight, state["conv1.weight"])


def test_weights_of_another_architecture_are_a_user_error(fake_imagenet_weights):
    path, _ = fake_imagenet_weights
    with pytest.raises(UserError, match="do not fit resnet50"):
        build_resnet_trunk("resnet50", in_channels=1, pretrained=True, weights_file=path)


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        FixMatchPUModel("resnet18", pretrained=True, weights_file=tmp_path / "nothing.pth")


@pytest.mark.parametrize("arch", ["resnet101", "vgg16", "resnet"])
def test_unknown_backbone_is_a_user_error_naming_the_key(arch):
    with pytest.raises(UserError, match=r"model\.backbone .*resnet18, resnet34, resnet50"):
        FixMatchPUModel(arch)


def test_the_ana_classifier_still_builds():
    model = build_resnet_classifier("resnet18", 5)
    assert model.fc.out_features == 5 and model.conv1.in_channels == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ---------------------------------------------------------------------------------------- EMA
def small_student():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))


def train_a_little(student, steps=1):
    """Change the student's parameters (an SGD step) and BN buffers (a train-mode forward)."""
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    student.train()
    for _ in range(steps):
        loss = student(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("start_step, decay_used", [(0, 0.1), (2, 3 / 12), (1000, 0.9)])
def test_ema_update_arithmetic(start_step, decay_used):
    """p_t = d_t p_t + (1 - d_t) p_s with the warm-up d_t = min(decay, (1 + t) / (10 + t))."""
    student = small_student()
    ema = EMATeacher(student, decay=0.9)
    assert ema.model is not student
    ema.step = start_step
    assert ema.current_decay() == pytest.approx(decay_used)
    train_a_little(student, steps=3)
    old = {k: v.clone() for k, v in ema.model.named_parameters()}
    ema.update(student)
    assert ema.step == start_step + 1
    for name, s in student.named_parameters():
        expected = decay_used * old[name] + (1 - decay_used) * s.detach()
        assert torch.allclose(ema.model.get_parameter(name), expected, atol=1e-6, rtol=0), name
    # the teacher moved towards the student but is not the student (the first layer's bias has no
    # gradient under the BatchNorm that follows, so compare the weights)
    assert not torch.equal(ema.model.get_parameter("0.weight"), student.get_parameter("0.weight"))
    assert not torch.equal(ema.model.get_parameter("0.weight"), old["0.weight"])
    for name, s in student.named_buffers():
        assert torch.equal(ema.model.get_buffer(name), s), name
    assert ema.model.get_buffer("1.num_batches_tracked").item() == 3


def test_ema_decay_warms_up_to_the_configured_value():
    ema = EMATeacher(small_student(), decay=0.999)
    expected = {0: 0.1, 90: 0.91, 990: 0.991, 20000: 0.999}
    for step, d in expected.items():
        ema.step = step
        assert ema.current_decay() == pytest.approx(d), step


def test_teacher_is_a_frozen_eval_copy():
    student = small_student()
    ema = EMATeacher(student)
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in student.parameters())
    train_a_little(student)
    ema.update(student)
    assert not ema.model.training  # the student's train mode does not leak into the teacher
    out = ema.model(torch.randn(5, 4))
    assert out.grad_fn is None


def test_decay_zero_copies_the_student():
    student = small_student()
    copying = EMATeacher(student, decay=0.0)
    train_a_little(student)
    copying.update(student)
    for name, s in student.named_parameters():
        assert torch.equal(copying.model.get_parameter(name), s)
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(student, decay=1.5)


def test_disabled_teacher_is_the_student():
    student = small_student()
    ema = EMATeacher(student, decay=0.5, enabled=False)
    assert ema.model is student
    train_a_little(student)
    snapshot = {k: v.clone() for k, v in student.state_dict().items()}
    ema.update(student)
    for k, v in student.state_dict().items():
        assert torch.equal(v, snapshot[k])
    state = ema.state_dict()
    assert state["enabled"] is False
    other = small_student()
    EMATeacher(other, enabled=False).load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in snapshot.items())


def test_state_dict_round_trip_through_a_weights_only_file():
    student = small_student()
    ema = EMATeacher(student, decay=0.7)
    for _ in range(3):
        train_a_little(student)
        ema.update(student)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["decay"] == 0.7 and state["enabled"] is True and state["step"] == 3
    fresh = EMATeacher(small_student(), decay=0.999)
    fresh.load_state_dict(state)
    assert fresh.decay == 0.7 and fresh.step == 3
    for k, v in ema.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v)
    assert not fresh.model.training and not any(p.requires_grad for p in fresh.model.parameters())
    with pytest.raises(UserError, match="model.use_ema"):
        EMATeacher(small_student(), enabled=False).load_state_dict(state)


class Wrapper(nn.Module):
    """Stands for DistributedDataParallel / DataParallel: the real model is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_ema_accepts_a_wrapped_student():
    student = small_student()
    wrapped = Wrapper(student)
    ema = EMATeacher(wrapped, decay=0.5)
    ema.step = 10_000  # past the warm-up: d_t = decay
    assert set(ema.model.state_dict()) == set(student.state_dict())  # no "module." prefix
    train_a_little(wrapped)
    old = {k: v.clone() for k, v in ema.model.named_parameters()}
    ema.update(wrapped)
    for name, s in student.named_parameters():
        assert torch.allclose(ema.model.get_parameter(name), 0.5 * old[name] + 0.5 * s.detach(), atol=1e-6, rtol=0)
    assert unwrap_model(nn.DataParallel(student)) is student
    assert EMATeacher(wrapped, enabled=False).model is student


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_ema_with_a_real_ddp_student(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        student = small_student()
        ddp = DistributedDataParallel(student)
        ema = EMATeacher(ddp, decay=0.9)
        ema.step = 10_000  # past the warm-up: d_t = decay
        train_a_little(ddp)
        old = {k: v.clone() for k, v in ema.model.named_parameters()}
        ema.update(ddp)
        for name, s in student.named_parameters():
            expected = 0.9 * old[name] + (1 - 0.9) * s.detach()
            assert torch.allclose(ema.model.get_parameter(name), expected, atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()


def test_ema_of_the_fixmatch_model_follows_its_batchnorm_statistics():
    torch.manual_seed(0)
    student = FixMatchPUModel("resnet18", dropout=0.1)
    ema = EMATeacher(student, decay=0.99)
    student.train()
    with torch.no_grad():
        student(torch.randn(4, 1, 32, 32) * 3 + 1)
    ema.update(student)
    assert torch.equal(ema.model.trunk.bn1.running_mean, student.trunk.bn1.running_mean)
    assert ema.model.trunk.bn1.num_batches_tracked.item() == 1
    assert ema.model(torch.randn(2, 1, 32, 32)).shape == (2,)
