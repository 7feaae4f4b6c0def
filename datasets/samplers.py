"""Epoch-seeded instance samplers (resumable: the order depends on seed and epoch only)."""
import torch


class InstanceSampler(torch.utils.data.Sampler):
    """Shuffle the instances, or draw them by weight with replacement.

    ``set_weights(None)`` shuffles (the reference code forgot to; we do). With weights ``s``,
    each epoch draws ``len(s)`` indices with probability proportional to ``s``, like
    ``WeightedRandomSampler(s, num_samples=len(s), replacement=True)``. The generator is
    seeded from ``(seed, epoch)``, so a resumed run sees the same order as an unbroken one.

    Distributed training (``num_replicas`` processes): every process draws the same epoch order
    and takes items ``rank, rank + W, ...`` of it (wrapped to ``ceil(n / W)`` items each, so all
    processes run the same number of steps).
    """

    def __init__(self, num_items, seed=0, num_replicas=1, rank=0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self.weights = None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_weights(self, weights):
        if weights is not None and len(weights) != self.num_items:
            raise ValueError(f"sampler weights have {len(weights)} entries for {self.num_items} items")
        self.weights = None if weights is None else weights.detach().double().cpu()

    def __len__(self):
        return -(-self.num_items // self.num_replicas)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.multinomial(self.weights, self.num_items, replacement=True, generator=g)
        if self.num_replicas > 1:
            n = len(self) * self.num_replicas
            order = order[torch.arange(n) % self.num_items][self.rank::self.num_replicas]
        return iter(order.tolist())


def sampling_entropy(weights):
    """Entropy of the sampling distribution divided by ``log(n)`` (1 = uniform)."""
    p = weights.double() / weights.sum()
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return (h / torch.log(torch.tensor(float(len(p))))).item() if len(p) > 1 else 1.0
