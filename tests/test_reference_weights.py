"""Our instance weights against a literal re-creation of the reference code's layout.

The reference (github fletcherjiang/ANA-SelfPacedLearning, ``main.py`` and ``utils.py``) keeps
the weights of each group of tiles as one tensor, a parameter group of the network's
``torch.optim.Adam``; it looks a tile's weight up with a Python loop over the groups, weights
the BCE in place (``bce[target == 1] *= ...``), and with ``ulr-adaptive`` regroups the tiles
after each epoch and builds a new Adam. ``_reference_run`` below does exactly that, with the
same library calls, on a small linear network; ``_our_run`` runs the trainer's own epoch
(``train_epoch``: ``train_one_epoch`` then ``end_epoch``) on the same batches, with main.py's
default weight optimiser and network-Adam reset. The weights, the network and the stored
targets must agree to float precision after 3 epochs of 20 steps each.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import WeightedRandomSampler

import main
from datasets.samplers import InstanceSampler
from models.sample_weights import InstanceWeights, init_weights, sampler_weights
from utils.ana.epoch import EpochSetup, train_epoch

N_BAGS, TILES_PER_BAG, C, FEATURES, BATCH, EPOCHS = 80, 8, 5, 6, 32, 3
BETAS = (0.9, 0.999)


def _data(seed=0):
    """640 tiles of 80 bags with 1-3 labels each (float64 labels, as the reference read them)."""
    g = torch.Generator().manual_seed(seed)
    bag_labels = torch.zeros(N_BAGS, C, dtype=torch.float64)
    for b in range(N_BAGS):
        k = 1 + int(torch.randint(0, 3, (1,), generator=g))
        bag_labels[b, torch.randperm(C, generator=g)[:k]] = 1
    labels = bag_labels.repeat_interleave(TILES_PER_BAG, dim=0)
    filenames = np.repeat(np.array([f"bag{b}.png" for b in range(N_BAGS)]), TILES_PER_BAG)
    x = torch.randn(len(labels), FEATURES, generator=g)
    batches = [torch.randperm(len(labels), generator=g).view(-1, BATCH) for _ in range(EPOCHS)]
    return x, labels, filenames, batches


def _group_by_first_match(rows):
    """The reference's grouping loop: a row joins the first group whose label vector ``l2``
    satisfies ``(l1 - l2).sum() == 0``."""
    weight_idx, label_types = [], []
    for i, l1 in enumerate(rows):
        for j, l2 in enumerate(label_types):
            if (l1 - l2).sum() == 0:
                weight_idx[j].append(i)
                break
        else:
            label_types.append(l1)
            weight_idx.append([i])
    return weight_idx, label_types


def _split(values, weight_idx):
    flat = torch.tensor([i for group in weight_idx for i in group])
    sizes = [len(group) for group in weight_idx]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [values[flat][s:s + n] for s, n in zip(starts, sizes)], torch.argsort(flat)


def _reference_init(labels, filenames, weight_idx, method, granularity):
    """The reference's initial group tensors for ``iw-sample`` (label) and ``iw-data``."""
    n = len(labels)
    if method == "iw-sample":  # each bag's label counts over its tiles, normalised
        iw = torch.zeros((n, C), dtype=torch.float64)
        for name in np.unique(filenames):
            sub = labels[filenames == name].sum(dim=0)
            sub /= sub.sum()
            iw[filenames == name] = sub
        return _split(iw, weight_idx)
    if granularity == "sample":  # softmax over the groups of (group size / #tiles)
        iw = F.softmax(torch.tensor([len(w) for w in weight_idx]) / n, dim=0)
        weights = [torch.ones(len(weight_idx[k])) * iw[k] for k in range(len(weight_idx))]
        return weights, torch.argsort(torch.tensor([i for group in weight_idx for i in group]))
    iw = labels.sum(dim=0)  # class frequencies, then a softmax over each tile's positive classes
    iw /= iw.sum()
    iw = labels * iw
    iw[labels == 0] = float("-inf")
    iw = F.softmax(iw, dim=1)
    return _split(labels * iw, weight_idx)


def _reference_run(x, labels, filenames, batches, net, *, granularity, update_lr, training_label, weight_lr, lr,
                   weight_decay, seed):
    torch.manual_seed(seed)
    n = len(labels)
    weight_idx, label_types = _group_by_first_match(labels)
    counts = torch.stack(label_types).sum(dim=1)
    learning_rates = torch.ones(len(label_types)) if update_lr == "ulr-ones" else torch.log(counts) / torch.log(counts.max())
    weights, group_idx = _reference_init(labels, filenames, weight_idx, "iw-data", granularity)

    def new_optimizer():
        params = []
        for p, l in zip(weights, learning_rates):
            p.requires_grad = True
            params.append({"params": p, "lr": l * weight_lr})
        return torch.optim.Adam([{"params": net.parameters()}] + params, lr=lr, weight_decay=weight_decay, betas=BETAS)

    def loss_function(probabilities, target, weight):
        bce = F.binary_cross_entropy(probabilities, target, reduction="none")
        if granularity == "sample":
            bce *= F.relu(weight.nan_to_num())[:, None]
        else:
            bce[target == 1] *= F.relu(weight[target == 1].nan_to_num())
        return bce.sum()

    optimizer = new_optimizer()
    targets = labels.clone()
    for epoch_batches in batches:
        for index in epoch_batches:
            label = labels[index]
            if label.sum() == 0:
                continue
            weight = []
            for i in index:
                offset = 0
                for w in weights:
                    if group_idx[i] < offset + len(w):
                        weight.append(w[group_idx[i] - offset])
                        break
                    offset += len(w)
            weight = torch.stack(weight)
            target = label.float()
            if training_label != "real":
                if granularity == "sample":
                    target = label * F.relu(weight.detach().nan_to_num())[:, None]
                else:
                    target = label * F.relu(weight.detach().nan_to_num())
                lo, hi = target.min(dim=1, keepdim=True)[0], target.max(dim=1, keepdim=True)[0]
                target = (target - lo) / (hi - lo)
                target[torch.isnan(target)] = 0
                if training_label == "pseudo":
                    target = target.detach().bernoulli()
                targets[index] = target.detach().cpu()
                target = target.float()
            optimizer.zero_grad()
            probabilities = torch.sigmoid(net(x[index]))
            loss = loss_function(probabilities, target, weight)
            loss.backward()
            optimizer.step()
        if update_lr == "ulr-adaptive":
            with torch.no_grad():
                current = torch.cat(weights)[group_idx]
                weight_idx, label_types = _group_by_first_match((targets > 0).float())
                weights, group_idx = _split(current, weight_idx)
                counts = torch.stack(label_types).sum(dim=1)
                learning_rates = torch.log(counts) / torch.log(counts.max())
                learning_rates[torch.isinf(learning_rates)] = 0
                learning_rates[torch.isnan(learning_rates)] = 0
                optimizer = new_optimizer()
    return torch.cat(weights)[group_idx].detach(), targets


class _Identity:
    """The trainer's batch preprocessing without its random flips (the features are not images)."""
    device = torch.device("cpu")

    def __call__(self, x, train=False):
        return x


class _GivenOrder:
    """The sampler interface of ``train_epoch``; the batches are given, so it does nothing."""

    def set_epoch(self, epoch):
        pass

    def set_weights(self, weights):
        pass


def _our_run(x, labels, batches, net, *, granularity, update_lr, training_label, weight_lr, lr, weight_decay, seed):
    defaults = main.build_parser().parse_args([])  # main.py's defaults: what a user gets
    torch.manual_seed(seed)
    tile_labels = labels.float()
    targets = tile_labels.clone()
    weights = InstanceWeights(init_weights(tile_labels, "iw-data", granularity), targets, lr=weight_lr,
                              update_lr=update_lr, grouping=defaults.weightGroups, weight_decay=weight_decay,
                              optimizer=defaults.weightOptimizer)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay, betas=BETAS)
    setup = EpochSetup(model=net, optimizer=optimizer, weights=weights, loader=None, tile_labels=tile_labels,
                       targets=targets, preprocess=_Identity(), sampler=_GivenOrder(), granularity=granularity,
                       training_label=training_label, reset_optimizer=defaults.resetOptimizer)
    groups = [weights.group.clone()]  # the grouping each epoch trains with
    for epoch, epoch_batches in enumerate(batches, start=1):
        setup.loader = [(x[idx], idx) for idx in epoch_batches]
        stats = train_epoch(setup, epoch)
        assert stats["steps"] == len(epoch_batches) >= 20
        assert stats["restarted"] is (update_lr == "ulr-adaptive")
        assert (not optimizer.state) is (update_lr == "ulr-adaptive")  # the network's Adam was rebuilt too
        groups.append(weights.group.clone())
    return weights, targets, groups[:-1]


CASES = [(g, u, wd) for g in ("label", "sample") for u in ("ulr-ones", "ulr-adaptive") for wd in (0.0, 0.01)]


@pytest.mark.parametrize("granularity,update_lr,weight_decay", CASES)
def test_weights_equal_the_reference_layout(granularity, update_lr, weight_decay):
    x, labels, filenames, batches = _data()
    torch.manual_seed(1)
    net0 = torch.nn.Linear(FEATURES, C)
    kwargs = dict(granularity=granularity, update_lr=update_lr, training_label="pseudo", weight_lr=0.1, lr=0.01,
                  weight_decay=weight_decay, seed=7)
    ref_net, our_net = (torch.nn.Linear(FEATURES, C) for _ in range(2))
    ref_net.load_state_dict(net0.state_dict())
    our_net.load_state_dict(net0.state_dict())
    ref_alpha, ref_targets = _reference_run(x, labels, filenames, batches, ref_net, **kwargs)
    ours, our_targets, groups = _our_run(x, labels, batches, our_net, **kwargs)

    assert ours.alpha.shape == ref_alpha.shape
    torch.testing.assert_close(ours.alpha, ref_alpha.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_targets, ref_targets.float(), rtol=0, atol=0)
    for mine, theirs in zip(our_net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    moved = (ours.alpha - init_weights(labels.float(), "iw-data", granularity)).abs()
    assert moved.max() > 0.05  # the weights did move: the comparison is not between two constants
    if update_lr == "ulr-adaptive":  # pseudo-labels moved some tiles to another group before the last epoch
        assert any(not torch.equal(a, b) for a, b in zip(groups, groups[1:]))


@pytest.mark.parametrize("method,granularity", [("iw-sample", "label"), ("iw-data", "label"), ("iw-data", "sample")])
def test_our_init_equals_the_reference_init(method, granularity):
    x, labels, filenames, batches = _data()
    weight_idx, _ = _group_by_first_match(labels)
    assert len(weight_idx) == 3  # 1, 2 or 3 labels: the reference's groups are label counts
    weights, group_idx = _reference_init(labels, filenames, weight_idx, method, granularity)
    expected = torch.cat(weights)[group_idx].float()
    torch.testing.assert_close(init_weights(labels.float(), method, granularity), expected)


def test_the_reference_grouping_is_by_label_count_not_combination():
    rows = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0], [0, 1.0, 1.0]])
    weight_idx, _ = _group_by_first_match(rows)
    assert weight_idx == [[0, 1], [2, 3]]
    w = InstanceWeights(torch.ones(4, 3), rows, lr=0.1, grouping="count")
    assert w.group.tolist() == [0, 0, 1, 1]
    w = InstanceWeights(torch.ones(4, 3), rows, lr=0.1, grouping="combination")
    assert len(set(w.group.tolist())) == 4


def test_sampler_draws_what_the_reference_weighted_random_sampler_draws():
    x, labels, filenames, batches = _data()
    alpha = torch.rand(len(labels), C, generator=torch.Generator().manual_seed(3)) - 0.2  # some negative
    ours = InstanceSampler(len(labels), seed=5)
    ours.set_epoch(2)
    ours.set_weights(sampler_weights(alpha, labels.float()))
    sw = (F.relu(alpha.double().nan_to_num()) * labels).max(dim=1)[0]  # the reference's get_train_dataloader
    generator = torch.Generator().manual_seed(5 * 100003 + 2)  # InstanceSampler's epoch seed
    theirs = WeightedRandomSampler(sw, num_samples=len(sw), replacement=True, generator=generator)
    assert list(ours) == list(theirs)
    assert math.isclose(float(sw.sum()), float(sampler_weights(alpha, labels.float()).sum()), rel_tol=1e-6)
