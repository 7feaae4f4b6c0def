"""benchmarks/amp_agreement.py on tiny data: both runs of both families happen, with the precisions they claim."""
import math

from benchmarks import amp_agreement
from datasets.synthetic_cryoem import generate_cryoem_demo


def test_amp_agreement_runs_float32_then_bf16_for_both_families(tmp_path, capsys):
    data = generate_cryoem_demo(tmp_path / "data", n_pos=24, n_unl=96, n_val=32, n_test=32, patch_size=32, seed=2)
    out = amp_agreement.main(["--device", "cpu", "--data-dir", str(data), "--epochs", "1",
                              "--ana-data-dir", str(tmp_path / "ana"), "--ana-epochs", "1", "--ana-image-size", "32"])
    assert set(out) == {"cryoem", "ana"}
    for family, keys in (("cryoem", ("auc", "ap")), ("ana", ("f1_mi", "mAP"))):
        assert set(out[family]) == {"float32", "amp"}
        for run in out[family].values():
            assert all(math.isfinite(run[k]) for k in keys) and run["best_epoch"] == 1
    printed = capsys.readouterr()
    # each trainer logged the precision of each run: float32 first, then bf16 autocast
    log = printed.err + printed.out
    first = log.index("fast path: precision float32")
    second = log.index("fast path: precision bfloat16")
    assert first < second < log.index("fast path: precision float32", second) < \
        log.index("fast path: precision bfloat16", second + 1)
    assert "cryoem: f1" in printed.out and "ana: mAP" in printed.out and "difference" in printed.out
