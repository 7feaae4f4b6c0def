"""The self-paced method: weight initialisation, lr coefficients, targets, sampler, loss, update."""
import math

import pytest
import torch
import torch.nn.functional as F

from datasets.samplers import InstanceSampler, sampling_entropy
from models.losses_ana import weighted_bce_loss
from models.pseudo_labels import make_targets, weight_scores
from models.sample_weights import InstanceWeights, init_weights, lr_coefficients, sampler_weights, weight_stats
from utils.errors import UserError

# Four tiles, three classes: tile 0 from a single-label bag {0}, tiles 1-2 from bag {0, 1},
# tile 3 from bag {1, 2}. Class counts over tiles: [3, 3, 1].
T = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.float32)


def test_iw_ones():
    assert torch.equal(init_weights(T, "iw-ones", "label"), T)
    assert torch.equal(init_weights(T, "iw-ones", "sample"), torch.ones(4))


def test_iw_data_label_softmax_over_positive_classes():
    f = [3 / 7, 3 / 7, 1 / 7]  # class frequencies normalised to sum 1
    e1, e2 = math.exp(f[1]), math.exp(f[2])
    expected = torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0], [0, e1 / (e1 + e2), e2 / (e1 + e2)]])
    assert torch.allclose(init_weights(T, "iw-data", "label"), expected, atol=1e-6)


def test_iw_data_sample_softmax_over_label_count_groups():
    # the reference's groups are label counts: 1 label (1 tile), 2 labels (3 tiles) -> v = [1/4, 3/4]
    z = math.exp(0.25) + math.exp(0.75)
    expected = torch.tensor([math.exp(0.25) / z] + [math.exp(0.75) / z] * 3)
    assert torch.allclose(init_weights(T, "iw-data", "sample"), expected, atol=1e-6)


def test_iw_sample_is_one_over_label_count():
    expected = torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0.5, 0.5]])
    assert torch.allclose(init_weights(T, "iw-sample", "label"), expected)
    assert torch.allclose(init_weights(T, "iw-sample", "sample"), torch.tensor([1, 0.5, 0.5, 0.5]))


def test_init_rows_without_labels_are_zero_not_nan():
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    for method in ("iw-ones", "iw-data", "iw-sample"):
        w = init_weights(t, method, "label")
        assert torch.isfinite(w).all() and torch.equal(w[0], torch.zeros(2)), method


def test_ulr_adaptive_coefficients():
    assert torch.equal(lr_coefficients(T, "ulr-ones"), torch.ones(4))
    # label counts 1, 2, 2, 2 and C_max = 2: log(1)/log(2) = 0, log(2)/log(2) = 1
    assert torch.allclose(lr_coefficients(T, "ulr-adaptive"), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    t3 = torch.cat([T, torch.ones(1, 3)])  # one 3-label tile: C_max = 3
    lam = lr_coefficients(t3, "ulr-adaptive")
    assert torch.allclose(lam, torch.tensor([0, math.log(2) / math.log(3), math.log(2) / math.log(3),
                                             math.log(2) / math.log(3), 1.0]), atol=1e-6)


def test_ulr_adaptive_single_label_data_and_empty_rows_give_zero():
    single = torch.eye(3)
    assert torch.equal(lr_coefficients(single, "ulr-adaptive"), torch.zeros(3))  # C_max == 1: no NaN
    with_empty = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert torch.equal(lr_coefficients(with_empty, "ulr-adaptive"), torch.tensor([0.0, 1.0]))


def test_dispatcher_real_soft_pseudo():
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    alpha = torch.tensor([[0.2, 0.8, 0.5]])  # the 0.5 on a negative class must not count
    assert torch.equal(make_targets(labels, alpha, "real"), labels)
    assert torch.allclose(make_targets(labels, alpha, "soft"), torch.tensor([[0.25, 1.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([make_targets(labels, alpha, "pseudo", generator=g) for _ in range(4000)])
    assert torch.all(draws[:, 1] == 1)          # the largest-weight label is always kept
    assert torch.all(draws[:, 2] == 0)          # negatives never appear
    assert abs(draws[:, 0].mean().item() - 0.25) < 0.03  # kept with probability alpha_k / alpha_max


def test_dispatcher_sample_granularity_and_nan():
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.equal(weight_scores(labels, torch.tensor([0.3, float("nan")])),
                       torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))


def test_sampler_weights_and_all_zero_error():
    alpha = torch.tensor([[0.5, 0.0, 0.9], [-1.0, 0.3, 0.0], [float("nan"), 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(sampler_weights(alpha, labels), torch.tensor([0.5, 0.3, 0.0]))  # 0.9 is on a negative
    assert torch.allclose(sampler_weights(torch.tensor([0.2, -0.1, 0.4]), labels), torch.tensor([0.2, 0.0, 0.4]))
    with pytest.raises(UserError, match="dropped to zero"):
        sampler_weights(torch.tensor([[-0.1, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    zero = sampler_weights(torch.tensor([[-0.1, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]), strict=False)
    assert torch.equal(zero, torch.zeros(1))  # without the sampler: no error


def test_weight_stats_counts_dropped_pairs():
    alpha = torch.tensor([[0.5, -0.3], [0.0, 0.25]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    stats = weight_stats(alpha, labels)  # weights in use on positive pairs: 0.5, ReLU(-0.3) = 0, 0.25
    assert stats["dropped_fraction"] == pytest.approx(1 / 3) and stats["mean"] == pytest.approx(0.25)
    assert stats["min"] == 0.0


def _bce(p, y):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_weighted_bce_label_granularity_value_and_gradient():
    z = torch.tensor([[0.3, -1.2], [2.0, 0.1]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    alpha = torch.tensor([[0.5, 0.7], [-0.2, 2.0]], requires_grad=True)
    loss = weighted_bce_loss(z, y, alpha, "label")
    p = [[1 / (1 + math.exp(-v)) for v in row] for row in z.tolist()]
    # weights: ReLU(alpha) where y == 1, 1 elsewhere; alpha -0.2 -> 0 drops that pair
    expected = 0.5 * _bce(p[0][0], 1) + 1.0 * _bce(p[0][1], 0) + 0.0 * _bce(p[1][0], 1) + 2.0 * _bce(p[1][1], 1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d loss / d alpha = BCE on weighted entries with alpha > 0, else 0
    expected_grad = torch.tensor([[_bce(p[0][0], 1), 0.0], [0.0, _bce(p[1][1], 1)]])
    assert torch.allclose(alpha.grad, expected_grad, atol=1e-6)
    assert torch.all(alpha.grad >= 0)  # weights can only shrink under descent


def test_weighted_bce_soft_targets_weight_only_the_entries_at_one():
    # soft targets (0.25, 1, 0): the reference multiplies only bce[target == 1] by the weight
    z = torch.tensor([[0.3, -1.2, 0.8]])
    y = torch.tensor([[0.25, 1.0, 0.0]])
    alpha = torch.tensor([[0.4, 0.5, 0.9]], requires_grad=True)
    loss = weighted_bce_loss(z, y, alpha, "label")
    p = [1 / (1 + math.exp(-v)) for v in z[0].tolist()]
    expected = _bce(p[0], 0.25) + 0.5 * _bce(p[1], 1.0) + _bce(p[2], 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.allclose(alpha.grad, torch.tensor([[0.0, _bce(p[1], 1.0), 0.0]]), atol=1e-6)


def test_weighted_bce_sample_granularity_and_nan_weight():
    z = torch.tensor([[0.3, -1.2], [2.0, 0.1]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    alpha = torch.tensor([0.5, float("nan")], requires_grad=True)
    loss = weighted_bce_loss(z, y, alpha, "sample")
    expected = 0.5 * F.binary_cross_entropy_with_logits(z[0], y[0], reduction="sum").item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert alpha.grad[0].item() == pytest.approx(expected / 0.5, rel=1e-6)


def _adam_rows(alpha, grads, lr, steps, betas=(0.9, 0.999), eps=1e-8):
    """Adam by hand (Kingma & Ba 2015) for one parameter tensor over ``steps`` gradients."""
    m = torch.zeros_like(alpha)
    v = torch.zeros_like(alpha)
    for t, g in enumerate(grads[:steps], start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        alpha = alpha - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return alpha


def test_a_group_in_the_batch_steps_all_its_rows_and_other_groups_wait():
    # groups by label count: tiles 0 (1 label) | tiles 1, 2, 3 (2 labels)
    w = InstanceWeights(T.clone(), T, lr=0.1, grouping="count")
    assert w.group.tolist() == [0, 1, 1, 1]
    g1 = torch.tensor([[0.5, 0.2, 0.0]])
    w.step(torch.tensor([1]), g1)          # only tile 1 is drawn: its group (1, 2, 3) steps
    assert torch.equal(w.steps, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(w.alpha[0], T[0])   # group 0 had no tile in the batch: untouched
    assert torch.allclose(w.alpha[1], T[1] - 0.1 * torch.tensor([1.0, 1.0, 0.0]), atol=1e-6)  # first step: lr * sign
    assert torch.equal(w.alpha[2], T[2])   # zero gradient, zero momentum so far: no move yet
    w.step(torch.tensor([3]), torch.tensor([[0.0, 0.4, 0.3]]))
    # tile 1 was not in this batch but its group stepped: it keeps moving on its momentum
    full = torch.zeros(2, 4, 3)
    full[0, 1] = g1[0]
    full[1, 3] = torch.tensor([0.0, 0.4, 0.3])
    expected = _adam_rows(T.clone(), list(full), 0.1, 2)
    assert torch.allclose(w.alpha[1:], expected[1:], atol=1e-6)
    assert w.alpha[1, 0] < T[1, 0] - 0.1 - 0.05  # the second step moved it again
    assert torch.equal(w.steps, torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_group_learning_rates_and_duplicate_rows():
    t3 = torch.cat([T, torch.ones(1, 3)])  # label counts 1, 2, 2, 2, 3: lambda 0, log2/log3, 1
    w = InstanceWeights(t3.clone(), t3, lr=0.3, update_lr="ulr-adaptive", grouping="count")
    assert torch.allclose(w.group_lr, torch.tensor([0.0, 0.3 * math.log(2) / math.log(3), 0.3], dtype=torch.float64))
    w.step(torch.tensor([0, 4, 4]), torch.ones(3, 3))  # tile 4 drawn twice: one step of the summed gradient
    assert torch.equal(w.alpha[0], t3[0])  # lambda 0
    assert torch.allclose(w.alpha[4], torch.full((3,), 0.7), atol=1e-6)


def test_weight_decay_reaches_rows_outside_the_batch_of_a_stepping_group():
    w = InstanceWeights(torch.ones(3), torch.ones(3, 1), lr=0.1, grouping="one", weight_decay=0.5)
    w.step(torch.tensor([0]), torch.tensor([1.0]))
    assert torch.allclose(w.alpha, torch.full((3,), 0.9), atol=1e-6)  # grad 0 + 0.5 * 1 > 0 on every row


def test_end_epoch_restarts_only_ulr_adaptive():
    for update_lr, grouping, restarts in (("ulr-ones", "count", False), ("ulr-adaptive", "count", True),
                                          ("ulr-adaptive", "combination", True), ("ulr-ones", "one", False)):
        w = InstanceWeights(T.clone(), T, lr=0.1, update_lr=update_lr, grouping=grouping)
        w.step(torch.tensor([1, 3]), torch.ones(2, 3))
        new_targets = T.clone()
        new_targets[1, 1] = 0  # a pseudo-label dropped tile 1's second label
        assert w.end_epoch(new_targets) is restarts
        assert bool(w.steps.sum() == 0) is restarts and bool(w.exp_avg.abs().sum() == 0) is restarts
        if restarts and grouping == "count":
            assert w.group.tolist() == [0, 0, 1, 1]  # tile 1 now has one label
        elif not restarts:
            assert w.steps.sum() > 0


def test_one_group_always_steps():
    w = InstanceWeights(T.clone(), T, lr=0.1, grouping="one")
    assert w.group.tolist() == [0, 0, 0, 0] and torch.equal(w.group_lr, torch.tensor([0.1], dtype=torch.float64))
    w.step(torch.tensor([0]), torch.ones(1, 3))
    w.step(torch.tensor([3]), torch.ones(1, 3))
    assert w.alpha[0, 0] < 1 - 0.1 - 0.05  # moved twice: its group stepped on both batches


def test_invalid_step_is_skipped_without_a_host_sync():
    w = InstanceWeights(T.clone(), T, lr=0.1)
    w.step(torch.tensor([1]), torch.full((1, 3), float("inf")), valid=torch.tensor(False))
    assert torch.equal(w.alpha, T) and w.steps.sum() == 0


def test_state_round_trip_and_mismatch_errors():
    w = InstanceWeights(T.clone(), T, lr=0.1, update_lr="ulr-adaptive")
    w.step(torch.tensor([1, 2]), torch.rand(2, 3))
    state = w.state_dict()
    w2 = InstanceWeights(torch.zeros(4, 3), T, lr=0.1, update_lr="ulr-adaptive")
    w2.load_state_dict(state)
    for name in ("alpha", "exp_avg", "exp_avg_sq", "group", "group_lr", "steps"):
        assert torch.equal(getattr(w2, name), getattr(w, name)), name
    with pytest.raises(UserError, match="shape"):
        InstanceWeights(torch.zeros(5, 3), torch.ones(5, 3), lr=0.1, update_lr="ulr-adaptive").load_state_dict(state)
    with pytest.raises(UserError, match="--weightGroups count --updateLR ulr-adaptive"):
        InstanceWeights(torch.zeros(4, 3), T, lr=0.1, grouping="one").load_state_dict(state)
    with pytest.raises(UserError, match="older version"):
        w2.load_state_dict({k: v for k, v in state.items() if k != "group"})


def test_instance_sampler_shuffles_and_weights():
    s = InstanceSampler(50, seed=3)
    s.set_epoch(1)
    order = list(s)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert list(s) == order  # same seed and epoch, same order (resumable)
    s.set_epoch(2)
    assert list(s) != order
    w = torch.zeros(50)
    w[[4, 7]] = torch.tensor([1.0, 3.0])
    s.set_weights(w)
    drawn = torch.tensor(list(s))
    assert set(drawn.tolist()) <= {4, 7} and len(drawn) == 50
    assert sampling_entropy(torch.ones(10)) == pytest.approx(1.0)
    assert sampling_entropy(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(0.0)


def test_sgd_step_by_hand_duplicate_rows_lambda_zero_and_weight_decay():
    # label counts 1 | 2, 2, 2 | 3 with ulr-adaptive: lambda 0 | log2/log3 | 1
    t3 = torch.cat([T, torch.ones(1, 3)])
    alpha0 = torch.tensor([[0.9, 0, 0], [0.6, 0.7, 0], [0.5, 0.4, 0], [0, 0.8, 0.3], [0.2, 0.5, 0.6]])
    w = InstanceWeights(alpha0.clone(), t3, lr=0.3, update_lr="ulr-adaptive", grouping="count", weight_decay=0.1,
                        optimizer="sgd")
    idx = torch.tensor([0, 1, 4, 4])  # tile 4 drawn twice; tiles 2 and 3 are not in the batch
    grad = torch.tensor([[2.0, 0, 0], [0.5, 0.25, 0], [0.1, 0.2, 0.3], [0.4, 0.0, 0.1]])
    w.step(idx, grad)
    lam = {0: 0.0, 1: math.log(2) / math.log(3), 4: 1.0}
    expected = alpha0.clone()
    summed = {0: grad[0], 1: grad[1], 4: grad[2] + grad[3]}
    for i, g in summed.items():  # alpha -= lambda * lr * (grad + weight_decay * alpha), rows in the batch only
        expected[i] = alpha0[i] - lam[i] * 0.3 * (g + 0.1 * alpha0[i])
    torch.testing.assert_close(w.alpha, expected, rtol=0, atol=1e-7)
    assert torch.equal(w.alpha[0], alpha0[0])        # lambda 0: no move despite a large gradient
    assert torch.equal(w.alpha[2:4], alpha0[2:4])    # same group as tile 1, not in the batch: untouched
    assert not torch.equal(w.alpha[1], alpha0[1])
    # a second step with no momentum: the move depends only on this step's gradient
    before = w.alpha.clone()
    w.step(torch.tensor([1]), torch.zeros(1, 3))
    torch.testing.assert_close(w.alpha[1], before[1] * (1 - lam[1] * 0.3 * 0.1), rtol=0, atol=1e-7)
    assert torch.equal(w.alpha[4], before[4])


def test_sgd_step_is_proportional_to_the_loss_and_adam_is_not():
    # two tiles of one group, gradients (the pairs' BCE) 0.1 and 1.0
    grads = torch.tensor([[0.1], [1.0]])
    sgd = InstanceWeights(torch.ones(2, 1), torch.ones(2, 1), lr=0.1, grouping="one", optimizer="sgd")
    adam = InstanceWeights(torch.ones(2, 1), torch.ones(2, 1), lr=0.1, grouping="one")
    sgd.step(torch.tensor([0, 1]), grads)
    adam.step(torch.tensor([0, 1]), grads)
    torch.testing.assert_close(1 - sgd.alpha, 0.1 * grads)
    torch.testing.assert_close(1 - adam.alpha, torch.full((2, 1), 0.1))  # lr * sign on the first step


def test_sgd_sample_granularity_and_skipped_step():
    w = InstanceWeights(torch.ones(3), torch.ones(3, 2), lr=0.5, grouping="one", optimizer="sgd")
    w.step(torch.tensor([2]), torch.tensor([0.4]), valid=torch.tensor(False))
    assert torch.equal(w.alpha, torch.ones(3)) and w.steps.sum() == 0
    w.step(torch.tensor([2, 2]), torch.tensor([0.4, 0.2]))
    torch.testing.assert_close(w.alpha, torch.tensor([1.0, 1.0, 0.7]))
    assert w.steps.tolist() == [1.0]


def test_sgd_state_round_trip_and_optimizer_mismatch():
    w = InstanceWeights(T.clone(), T, lr=0.1, optimizer="sgd")
    w.step(torch.tensor([1, 2]), torch.rand(2, 3))
    w2 = InstanceWeights(torch.zeros(4, 3), T, lr=0.1, optimizer="sgd")
    w2.load_state_dict(w.state_dict())
    assert torch.equal(w2.alpha, w.alpha) and torch.equal(w2.steps, w.steps)
    with pytest.raises(UserError, match="--weightOptimizer sgd"):
        InstanceWeights(torch.zeros(4, 3), T, lr=0.1).load_state_dict(w.state_dict())
    with pytest.raises(ValueError, match="weight optimizer"):
        InstanceWeights(T.clone(), T, lr=0.1, optimizer="rmsprop")
