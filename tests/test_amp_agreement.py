"""benchmarks/amp_agreement.py on tiny data: both runs happen, with the precisions they claim."""
import math

from benchmarks import amp_agreement
from datasets.synthetic_cryoem import generate_cryoem_demo


def test_amp_agreement_runs_float32_then_bf16(tmp_path, capsys):
    data = generate_cryoem_demo(tmp_path / "data", n_pos=24, n_unl=96, n_val=32, n_test=32, patch_size=32, seed=2)
    out = amp_agreement.main(["--device", "cpu", "--data-dir", str(data), "--epochs", "1"])
    assert set(out) == {"float32", "amp"}
    for run in out.values():
        assert all(math.isfinite(run[k]) for k in ("auc", "ap")) and run["best_epoch"] == 1
    printed = capsys.readouterr()
    # the trainer logged the precision of each run: float32 first, then bf16 autocast
    log = printed.err + printed.out
    assert log.index("fast path: precision float32") < log.index("fast path: precision bfloat16")
    assert "difference" in printed.out
