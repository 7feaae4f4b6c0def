"""benchmarks/bench_cryoem.py: one tiny CPU run (keys, sane numbers, one table) and its bad flags.

Speed is never asserted: only that every rate and ratio is a positive finite number.
"""
import math

import pytest

from benchmarks import bench_cryoem

# the smallest settings: 32 px patches (1 x 1 layer4 features), batches of 5 (1 positive + 4
# unlabelled), 128 x 128 micrograph (4 x 4 map), crop loop on 64 x 64 (4 crops)
TINY = ["--device", "cpu", "--patch-size", "32", "--context", "0", "--batch-size", "5", "--steps", "2", "--warmup", "1",
        "--micrograph-size", "128", "--loop-size", "64", "--repeats", "1", "--seed", "3"]

RATES = ("supervised_patches_per_s", "fixmatch_patches_per_s", "dense_micrographs_per_s",
         "crops_micrographs_per_s", "loop_micrographs_per_s")
RATIOS = ("fixmatch_cost_ratio", "dense_vs_crops_speedup", "dense_vs_loop_speedup", "crops_vs_loop_speedup")


def test_tiny_cpu_run_returns_every_number_and_prints_one_table(capsys):
    out = bench_cryoem.main(TINY)
    expected = {"torch", "device", "threads", "backbone", "patch_size", "context", "batch_size", "steps",
                "micrograph_size", "loop_size", "loop_batch", "stride", *RATES, *RATIOS,
                "max_abs_prob_diff", "mean_abs_prob_diff", "map_correlation", "pick_threshold", "picks_crops",
                "picks_dense", "picks_matched", "pick_agreement", "loop_check_max_abs_diff", "seconds", "tile_size",
                "tiles"}
    assert expected <= set(out), f"missing keys: {sorted(expected - set(out))}"
    assert (out["device"], out["patch_size"], out["batch_size"], out["steps"], out["stride"]) == ("cpu", 32, 5, 2, 32)
    for key in RATES + RATIOS:
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    # the ratios are the rates' quotients, not numbers made up elsewhere
    assert out["fixmatch_cost_ratio"] == pytest.approx(out["supervised_patches_per_s"] / out["fixmatch_patches_per_s"])
    assert out["dense_vs_crops_speedup"] == pytest.approx(out["dense_micrographs_per_s"] / out["crops_micrographs_per_s"])
    assert out["dense_vs_loop_speedup"] == pytest.approx(out["dense_micrographs_per_s"] / out["loop_micrographs_per_s"])
    # the crop loop classifies the same crops as models.dense's "crops" mode
    assert out["loop_check_max_abs_diff"] < 1e-4
    assert 0.0 <= out["mean_abs_prob_diff"] <= out["max_abs_prob_diff"] <= 1.0
    assert 0 <= out["picks_matched"] <= min(out["picks_dense"], out["picks_crops"])
    assert out["picks_crops"] >= 1  # the threshold is a value of the crop map, so its maximum is a pick
    assert out["tiles"] == [1, 1]  # a 128 px micrograph fits one tile of the default size

    printed = capsys.readouterr().out
    assert printed.startswith(f"torch {out['torch']} | ") and "device cpu" in printed and "threads" in printed
    assert printed.count("measurement") == 1  # one table
    for label in ("supervised step", "selective FixMatch step", "speedup dense / crop loop", "max |p_dense - p_crops|"):
        assert label in printed


@pytest.mark.parametrize("flags", [
    ["--patch-size", "48"],                          # not a multiple of the trunk stride
    ["--patch-size", "64", "--context", "32"],       # no window left inside the context
    ["--micrograph-size", "32"],                     # smaller than a patch
    ["--micrograph-size", "128", "--loop-size", "256"],
    ["--steps", "0"],
    ["--batch-size", "2"],                           # a 1:4 batch needs >= 1 of each
    ["--device", "nonsense"],
])
def test_bad_flags_exit_with_one_line(flags, capsys):
    argv = TINY + flags  # later flags win
    with pytest.raises(SystemExit) as exc:
        bench_cryoem.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
