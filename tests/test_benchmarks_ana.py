"""Smoke test of benchmarks/bench_ana.py: the smallest run, in-process, and its bad flags.

Timings depend on the machine, so nothing here compares speeds: the run must return every
number, each finite (and positive where it is a time or a rate), on the data it was asked for.
"""
import math

import pytest

from benchmarks import bench_ana

SMALLEST = ["--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
            "--num-workers", "0", "--epochs", "1", "--n-train", "3", "--n-test", "3", "--seed", "1"]
KEYS = {"train_tiles", "test_tiles", "time_ratio", "time_ratio_pooled", "time_ratio_min", "time_ratio_max", "cpu_time_ratio",
        "overhead_pct", "test_images_per_s", "test_bags_per_s"} | {
    f"{path}_{what}" for path in ("method", "plain")
    for what in ("images_per_s", "epoch_s", "data_s", "compute_s", "data_fraction", "cpu_s")}


def test_smallest_run_returns_every_number_and_prints_one_table(capsys):
    result = bench_ana.main(SMALLEST)
    assert set(result) == KEYS
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in result.values()), result
    assert all(v > 0 for k, v in result.items() if k != "overhead_pct"), result
    # 3 training and 3 test images of 2 x 2 tiles
    assert result["train_tiles"] == 12 and result["test_tiles"] == 12
    assert result["method_data_fraction"] < 1 and result["plain_data_fraction"] < 1
    assert result["overhead_pct"] == pytest.approx(100 * (result["time_ratio"] - 1))
    assert result["time_ratio_min"] <= result["time_ratio"] * (1 + 1e-9)
    assert result["time_ratio"] <= result["time_ratio_max"] * (1 + 1e-9)
    # equal images per epoch: the pooled ratio is a mediant of the per-epoch ones
    assert result["time_ratio_min"] * (1 - 1e-9) <= result["time_ratio_pooled"] <= result["time_ratio_max"] * (1 + 1e-9)
    assert result["time_ratio_pooled"] == pytest.approx(result["plain_images_per_s"] / result["method_images_per_s"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("env: torch ") and "device cpu" in out[0]
    table = [line for line in out if line.startswith("|")]
    assert len(table) == len(out) - 2  # env line, settings line, then only the table
    assert [c.strip() for c in table[0].split("|")[1:-1]] == ["measure", "ANA method", "plain BCE", "method/plain"]
    assert any("method overhead" in line and "%" in line for line in table)


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--epochs", "0"), ("--num-workers", "-1"),
                                         ("--n-train", "2"), ("--n-test", "2"), ("--arch", "vgg16")])
def test_bad_flags_exit_with_usage_error(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_ana.main([*SMALLEST, flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_user_error(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bench_ana.main([*SMALLEST, "--device", "cuda"])
    assert exc.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err
