"""benchmarks/gpu_check.py: the --smoke run (every part on the CPU), and the one-line refusal without a GPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from utils.distributed import collective_device

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_runs_every_part_and_writes_the_table(tmp_path, capsys):
    out = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    rows = out["rows"]
    assert {r["part"] for r in rows} == {name for name, _, _ in gpu_check.PARTS}
    assert not [r for r in rows if r["result"] in ("FAIL", "error", "timeout")], rows
    checks = {(r["part"], r["check"]): r for r in rows}
    # on the CPU a kill -9 after epoch 1 and a resume give the uninterrupted run bit for bit, and a
    # 1-process torchrun run (a process group of one, gloo) gives the plain run
    for part in ("ana_resume", "cryoem_resume"):
        mine = [r for (p, _), r in checks.items() if p == part]
        assert len(mine) == 2 and all(r["result"] == "pass" and r["max_param_diff"] == 0.0 for r in mine), mine
        assert any("over gloo" in r["note"] for r in mine)
    assert all(r["result"] == "pass" for r in rows if r["part"] in ("weights", "dense_map"))
    assert [r["result"] for r in rows if r["part"] == "speed_ana_compile"] == ["skipped"]
    speeds = [r for r in rows if r["part"].startswith("speed_ana_") and r["result"] == "info"]
    assert len(speeds) == 3 and all(r["method_images_per_s"] > 0 for r in speeds)
    # the same table on the terminal and in gpu_check.md; the JSON holds the rows
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| " + " | ".join(gpu_check.TABLE_HEAD) + " |" in table
    assert table.count("\n| ") == len(rows) + 1 and table in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_check.json").read_text())["rows"][0]["part"] == rows[0]["part"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); run it with --smoke to exercise "
        "the same code on the CPU"]
    assert not (tmp_path / "gpu_check.md").exists()


def test_nccl_collectives_take_gpu_tensors(monkeypatch):
    """NCCL takes no CPU tensors (a 1-GPU torchrun run on an H200 failed on a CPU checksum)."""
    assert collective_device("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device("nccl") == torch.device("cuda", 0)
