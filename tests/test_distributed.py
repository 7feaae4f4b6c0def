"""Multi-process CryoEM training: the sharded P:U sampler, and a 2-process gloo run under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datasets.cryoem_dataset_pu import PUBatchSampler
from datasets.synthetic_cryoem import generate_cryoem_demo
from utils.cryoem.config import default_config
from utils.distributed import DistInfo, mean_over_processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_sampler_splits_one_epoch_between_the_processes(world):
    full = PUBatchSampler(30, 200, 10, ratio=[1, 4], seed=5)
    full.set_epoch(2)
    batches = list(full)
    shards = []
    for rank in range(world):
        s = PUBatchSampler(30, 200, 10, ratio=[1, 4], seed=5, num_replicas=world, rank=rank)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(s) == len(shards[-1]) == -(-len(batches) // world)  # equal counts for DDP
    # process r takes batches r, r + W, ...; the last round wraps to the first batches
    for rank, shard in enumerate(shards):
        assert shard == [batches[(rank + i * world) % len(batches)] for i in range(len(shard))]
    seen = {i for shard in shards for b in shard for i in b}
    assert set(range(30, 230)) <= seen  # together the processes see every unlabelled patch
    with pytest.raises(ValueError, match="rank 2 is not in"):
        PUBatchSampler(30, 200, 10, num_replicas=2, rank=2)


def test_single_process_helpers_are_no_ops():
    values = {"loss": 1.5, "steps": 3}
    assert mean_over_processes(values, DistInfo(), torch.device("cpu"), sum_keys=("steps",)) is values
    assert not DistInfo().enabled and DistInfo().is_main


def _config(tmp_path, data):
    cfg = default_config()
    cfg["data"].update(data_dir=str(data), num_workers=0)
    cfg["training"].update(epochs=3, batch_size=16, device="cpu", early_stopping_patience=0)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(tmp_path, cfg, name, nproc):
    script = str(ROOT / "train_pu_selective_fixmatch.py")
    args = ["--config", str(cfg), "--output-dir", str(tmp_path / "runs"), "--exp-name", name]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        cmd = [sys.executable, script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "runs" / name, proc


def test_two_gloo_processes_train_like_one(tmp_path):
    # the generator's FFTs round differently with 1 and 2 threads; generated single-threaded (as
    # the training subprocesses run) the data are the same on every machine, and so is the outcome
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = generate_cryoem_demo(tmp_path / "data", n_pos=48, n_unl=192, n_val=64, n_test=128, patch_size=32,
                                    seed=1, snr=0.3)
    finally:
        torch.set_num_threads(threads)
    cfg = _config(tmp_path, data)
    one, _ = _train(tmp_path, cfg, "one", 1)
    two, proc = _train(tmp_path, cfg, "two", 2)

    log = (two / "train.log").read_text()
    assert "2 processes (DistributedDataParallel)" in log
    assert "batches of 8 per process (2 processes)" in log  # the global batch of 16, split
    assert "student parameters identical on the 2 processes" in log  # gradients were averaged
    # only the main process wrote: one log, one event file, no second run directory
    assert len(list(two.glob("events.out.tfevents*"))) == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one", "two"]
    # only the main process takes the run lock (a second taker would have been refused), released at the end
    assert not (two / "run.lock").exists()
    # the same number of optimiser steps as one process (the global batch is the same)
    last1 = torch.load(one / "last.pt", weights_only=True)
    last2 = torch.load(two / "last.pt", weights_only=True)
    assert last2["scheduler"]["last_epoch"] == last1["scheduler"]["last_epoch"] > 0
    # the metrics match within the noise of a 2-epoch run on 64 test patches
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    assert abs(r1["test"]["auc"] - r2["test"]["auc"]) < 0.1
    assert r2["epochs_run"] == r1["epochs_run"] == 3


# ----------------------------------------------------------------------------- ANA (main.py)
def test_sharded_instance_sampler():
    from datasets.samplers import InstanceSampler
    weights = torch.rand(11).double() + 0.1
    full = InstanceSampler(11, seed=4)
    full.set_epoch(3)
    full.set_weights(weights)
    order = list(full)
    shards = []
    for rank in range(2):
        s = InstanceSampler(11, seed=4, num_replicas=2, rank=rank)
        s.set_epoch(3)
        s.set_weights(weights)
        shards.append(list(s))
        assert len(s) == len(shards[-1]) == 6
    padded = order + order[:1]
    assert shards[0] == padded[0::2] and shards[1] == padded[1::2]


# sgd: one epoch, whose draws come from the initial weights in both runs (in epoch 2 the sampler's
# probabilities are the weights, which the two networks' training noise has moved differently)
@pytest.mark.parametrize("weight_optimizer,epochs", [("adam", 2), ("sgd", 1)])
def test_two_gloo_processes_train_main_py_like_one(tmp_path, weight_optimizer, epochs):
    from datasets.synthetic_ana import generate_ana_demo
    from tests.conftest import cpu_argv
    data = tmp_path / "ana"
    generate_ana_demo(data, n_train=16, n_val=4, n_test=4, tiles_x=2, tiles_y=2, tile_size=128, num_classes=4,
                      max_labels=3, seed=1)
    runs = {}
    for name, nproc in (("one", 1), ("two", 2)):
        argv = cpu_argv(data, tmp_path / name, tmp_path / "cache", "--epoch", str(epochs), "--sampling",
                        "--trainingLabel", "pseudo", "--lr", "1e-3", "--weightOptimizer", weight_optimizer,
                        *(("--weight_lr", "1e-3") if weight_optimizer == "adam" else ()))
        script = str(ROOT / "main.py")
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
               if nproc > 1 else [sys.executable, script])
        proc = subprocess.run(cmd + argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = tmp_path / name
    log = (runs["two"] / "output.txt").read_text()
    assert "2 processes (DistributedDataParallel)" in log
    assert "network and instance weights identical on the 2 processes" in log  # gathered weight updates
    last1 = torch.load(runs["one"] / "last.pt", weights_only=True)
    last2 = torch.load(runs["two"] / "last.pt", weights_only=True)
    assert last2["epoch"] == last1["epoch"] == epochs
    # the two processes' batches together are the one-process batch, so every tile's weight took
    # exactly the steps it took in one process (the gathered rows), and the weights end close
    assert torch.equal(last2["weights"]["steps"], last1["weights"]["steps"]) and last1["weights"]["steps"].sum() > 0
    assert last1["weights"]["optimizer"] == last2["weights"]["optimizer"] == weight_optimizer
    # sgd moves a weight by lr * its pair's loss, and the two networks' losses differ by training
    # noise (BatchNorm over 4 tiles per process instead of 8, other flips): only the size of the
    # moves differs; which (tile, label) pairs moved must be the same
    tolerance = 0.01 if weight_optimizer == "adam" else 0.25
    assert float((last1["weights"]["alpha"] - last2["weights"]["alpha"]).abs().max()) < tolerance
    if weight_optimizer == "sgd":
        def moved(alpha):  # iw-ones starts every weight at 0 or 1; a step moves it off
            return (alpha != 0) & (alpha != 1)
        moved1, moved2 = moved(last1["weights"]["alpha"]), moved(last2["weights"]["alpha"])
        assert torch.equal(moved1, moved2) and 0 < int(moved1.any(dim=1).sum()) < len(moved1)
    # the test metrics are not compared: each process draws its own flips and pseudo-labels, so
    # the two networks differ by training noise, which on 4 test images moves mAP by 0.15-0.2
    r2 = json.loads((runs["two"] / "results.json").read_text())
    assert r2 and all(0.0 <= r["test_results"]["mAP"] <= 1.0 for r in r2)
