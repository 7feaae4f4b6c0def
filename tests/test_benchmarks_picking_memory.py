"""benchmarks/picking_memory.py: a small run measures each tile size in its own process."""
import pytest

from benchmarks import picking_memory


def test_small_run_reports_each_tile_size(capsys):
    out = picking_memory.main(["--size", "600", "--tile-sizes", "0", "512"])
    assert [r["tile_size"] for r in out["rows"]] == [0, 512]
    for r in out["rows"]:
        assert r["peak_rss_mib"] >= r["rss_before_mib"] > 0 and r["seconds"] > 0
    assert out["same_candidates"]  # the tiled map is the untiled one
    printed = capsys.readouterr().out
    assert "untiled" in printed and "peak RSS (MiB)" in printed


def test_bad_sizes_exit_with_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        picking_memory.main(["--size", "100"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --size 100")
