"""train_one_epoch on hand-made batches: skipped batches, reported loss, non-finite abort."""
import pytest
import torch

from models.losses_ana import weighted_bce_loss
from models.sample_weights import InstanceWeights
from utils.ana.epoch import BatchPreprocessor, EpochSetup, train_one_epoch
from utils.errors import UserError

LABELS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # tiles 2 and 3: no label


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))  # no BN: loss is a pure function
    x = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)
    weights = InstanceWeights(LABELS * 0.5, LABELS, lr=0.1)
    preprocess = BatchPreprocessor((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    return model, x, weights, preprocess


def _epoch_setup(model, loader, optimizer, weights, preprocess, **options):
    """One epoch's EpochSetup on the hand-made labels (``targets``: a fresh copy unless given)."""
    targets = options.pop("targets", None)
    return EpochSetup(model=model, optimizer=optimizer, weights=weights, loader=loader, tile_labels=LABELS,
                      targets=LABELS.clone() if targets is None else targets, preprocess=preprocess,
                      granularity="label", training_label="real", **options)


def _run(model, loader, weights, preprocess, targets=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_one_epoch(_epoch_setup(model, loader, optimizer, weights, preprocess, targets=targets))


def test_all_zero_label_batches_are_skipped():
    model, x, weights, preprocess = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    alpha_before = weights.alpha.clone()
    stats = _run(model, [(x[2:], torch.tensor([2, 3]))], weights, preprocess)
    assert stats["skipped_batches"] == 1 and stats["steps"] == 0 and stats["images"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no optimiser step
    assert torch.equal(weights.alpha, alpha_before)


def test_reported_loss_is_the_summed_loss_per_image_before_the_step():
    idx = torch.tensor([0, 1, 2])  # tile 2 has no label, but the batch has labels: not skipped
    model, x, weights, preprocess = _setup()
    torch.manual_seed(123)  # the training preprocessing draws random flips: replay them
    flipped = preprocess(x[idx], train=True)
    with torch.no_grad():
        expected = weighted_bce_loss(model(flipped), LABELS[idx], weights.alpha[idx], "label").item() / 3

    model, x, weights, preprocess = _setup()
    alpha_before = weights.alpha.clone()
    torch.manual_seed(123)
    stats = _run(model, [(x[idx], idx)], weights, preprocess)
    assert stats["steps"] == 1 and stats["images"] == 3 and stats["skipped_batches"] == 0
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(weights.alpha[:2], alpha_before[:2])  # the batch's weights took their step


def test_non_finite_loss_stops_with_a_user_error():
    model, x, weights, preprocess = _setup()
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with pytest.raises(UserError, match="loss became nan"):
        _run(model, [(x[:2], torch.tensor([0, 1]))], weights, preprocess)


def test_float16_loss_scaling_leaves_the_network_and_weight_steps_unchanged():
    # the same step in float32 and with a float16 GradScaler (CPU autocast): the scaled
    # gradients must be unscaled for both the network (GradScaler) and the instance weights
    # (by hand), so both get the float32 gradient and take the float32 step
    from utils.precision import Precision
    idx = torch.tensor([0, 1])
    results = []
    for precision in (None, Precision(dtype=torch.float16, device_type="cpu",
                                      scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True))):
        model, x, weights, preprocess = _setup()
        seen = []
        step = weights.step
        weights.step = lambda rows, grad, valid=None: (seen.append(grad.clone()), step(rows, grad, valid))  # record
        torch.manual_seed(7)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_one_epoch(_epoch_setup(model, [(x[idx], idx)], optimizer, weights, preprocess, precision=precision))
        results.append((model[1].weight.detach().clone(), weights.alpha.clone(), seen[0]))
    (w32, a32, g32), (w16, a16, g16) = results
    torch.testing.assert_close(g16, g32, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(w16, w32, atol=2e-3, rtol=0)
    torch.testing.assert_close(a16, a32, atol=2e-3, rtol=0)


@pytest.mark.parametrize("update_lr,reset,cleared", [("ulr-adaptive", True, True), ("ulr-adaptive", False, False),
                                                     ("ulr-ones", True, False), ("ulr-ones", False, False)])
def test_end_epoch_resets_the_network_adam_only_when_the_reference_did(update_lr, reset, cleared):
    from utils.ana.epoch import end_epoch
    model, x, weights, preprocess = _setup()
    weights = InstanceWeights(LABELS * 0.5, LABELS, lr=0.1, update_lr=update_lr)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    train_one_epoch(_epoch_setup(model, [(x[:2], torch.tensor([0, 1]))], optimizer, weights, preprocess))
    assert optimizer.state
    assert end_epoch(weights, LABELS.clone(), optimizer, reset_optimizer=reset) is (update_lr == "ulr-adaptive")
    assert (not optimizer.state) is cleared
