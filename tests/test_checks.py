"""Bad flags and output locations: refused at parse time / before any work, in one line, exit code 2.

Covers every numeric flag of the six commands (NaN, infinities, zero or negative sizes and
counts, fractions outside their range), the ranges of config.py's defaults, and output
locations that are files or cannot be written (utils/checks.py).
"""
import argparse
import math
import os

import pytest

import evaluate_picks
import main
import main_single
import pick_particles
import preprocess_cryoem
import train_pu_selective_fixmatch
from conftest import expect_error_line
from utils.checks import check_output_dir, float_arg, int_arg, range_problem
from utils.errors import UserError


# ------------------------------------------------------------------------ the argparse types

@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "0", "-1", "abc", ""])
def test_positive_float_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a finite number > 0, got"):
        float_arg(0, low_open=True)(text)


def test_float_arg_bounds_and_values():
    fraction = float_arg(0, 1, low_open=True)
    assert fraction("1") == 1.0 and fraction("1e-3") == 1e-3
    for text in ("0", "1.5", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 1\]"):
            fraction(text)
    assert float_arg()("-3.5") == -3.5
    with pytest.raises(argparse.ArgumentTypeError, match="expected a finite number, got 'inf'"):
        float_arg()("inf")


def test_int_arg_bounds_and_values():
    assert int_arg(1)("3") == 3 and int_arg(0, 10)("10") == 10
    for text in ("0", "1.5", "nan", "2e3", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1"):
            int_arg(1)(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 10\], got '11'"):
        int_arg(0, 10)("11")


def test_range_problem_never_accepts_bools_or_non_finite_values():
    assert range_problem(True, integer=True, low=0) is not None
    assert range_problem(math.nan) is not None and range_problem(math.inf, low=0) is not None
    assert range_problem(2.0, integer=True) is not None  # a float is not an integer
    assert range_problem(0.5, low=0, high=1) is None


# ------------------------------------------------- every numeric flag of every command, at parse time

DUMMY = {  # required arguments of each command (never reached: parsing fails first)
    main: [], main_single: [], train_pu_selective_fixmatch: [],
    preprocess_cryoem: ["--micrographs", "M", "--coordinates", "C", "--output-dir", "OUT", "--particle-radius", "5"],
    pick_particles: ["--checkpoint", "CK", "--micrographs", "M", "--output-dir", "OUT"],
    evaluate_picks: ["--picks", "P", "--reference", "R", "--radius", "5"],
}
ANA_BAD = [("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-0.001"), ("--weight_lr", "inf"),
           ("--weight_lr", "nan"), ("--weight_lr", "-1"), ("--weightDecay", "nan"), ("--weightDecay", "-1"),
           ("--epoch", "0"), ("--epoch", "1.5"), ("--trainBatchSize", "0"), ("--testBatchSize", "-1"),
           ("--patience", "-1"), ("--resampleEvery", "0"), ("--numClasses", "-2"), ("--imageSize", "16"),
           ("--tileSize", "0"), ("--numWorkers", "-1"), ("--seed", "-1"), ("--seed", str(2**32))]
BAD_FLAGS = (
    [pytest.param(main, flag, value, id=f"main{flag}={value}") for flag, value in ANA_BAD]
    + [pytest.param(main_single, flag, value, id=f"main_single{flag}={value}")
       for flag, value in (("--lr", "nan"), ("--weight_lr", "inf"), ("--epoch", "0"))]
    + [pytest.param(train_pu_selective_fixmatch, flag, value, id=f"train{flag}={value}") for flag, value in (
        ("--batch-size", "0"), ("--batch-size", "-4"), ("--epochs", "0"), ("--epochs", "nan"), ("--seed", "-1"),
        ("--seed", str(2**32)), ("--num-workers", "-1"))]
    + [pytest.param(preprocess_cryoem, flag, value, id=f"preprocess{flag}={value}") for flag, value in (
        ("--particle-radius", "nan"), ("--particle-radius", "inf"), ("--particle-radius", "0"),
        ("--patch-size", "0"), ("--patch-size", "-64"), ("--context", "-32"), ("--stride", "0"),
        ("--downsample", "inf"), ("--downsample", "nan"), ("--downsample", "0.5"), ("--labelled-fraction", "0"),
        ("--labelled-fraction", "1.5"), ("--labelled-fraction", "nan"), ("--labelled-count", "0"),
        ("--positive-radius", "inf"), ("--positive-radius", "0"), ("--expected-particles", "inf"),
        ("--expected-particles", "-3"), ("--chunk-size", "0"), ("--seed", "-1"))]
    + [pytest.param(pick_particles, flag, value, id=f"pick{flag}={value}") for flag, value in (
        ("--threshold", "nan"), ("--threshold", "-0.1"), ("--threshold", "1.5"), ("--min-distance", "inf"),
        ("--min-distance", "0"), ("--min-distance", "nan"), ("--stride", "0"), ("--downsample", "0.5"),
        ("--downsample", "inf"), ("--box-size", "0"), ("--box-size", "-5"), ("--batch-size", "0"),
        ("--batch-size", "-1"))]
    + [pytest.param(evaluate_picks, flag, value, id=f"evaluate{flag}={value}") for flag, value in (
        ("--radius", "0"), ("--radius", "-2"), ("--radius", "nan"), ("--radius", "inf"), ("--threshold", "inf"),
        ("--threshold", "nan"))]
)


@pytest.mark.parametrize("entry, flag, value", BAD_FLAGS)
def test_every_numeric_flag_is_range_checked_at_parse_time(entry, flag, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear in the working directory
    line = expect_error_line(capsys, entry, [*DUMMY[entry], flag, value], only=True)
    assert line.startswith(f"error: argument {flag}: expected ") and repr(value) in line, line
    assert list(tmp_path.iterdir()) == []


def test_argparse_errors_are_one_line(capsys):
    line = expect_error_line(capsys, pick_particles, ["--micrographs", "M"], only=True)
    assert "the following arguments are required: --checkpoint, --output-dir" in line
    line = expect_error_line(capsys, main, ["--initWeight", "iw-foo"], only=True)
    assert "argument --initWeight: invalid choice: 'iw-foo'" in line


def test_config_defaults_are_range_checked_before_anything_is_written(ana_args, tmp_path, capsys, monkeypatch):
    import config
    monkeypatch.setattr(config, "WEIGHT_LR", math.inf)
    line = expect_error_line(capsys, main, ana_args("--epoch", "1"), only=True)
    assert line.startswith("error: --weight_lr (default from config.py): expected a finite number >= 0, got inf")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(config, "WEIGHT_LR", 5e-3)
    monkeypatch.setattr(config, "SGD_WEIGHT_LR", -0.1)
    line = expect_error_line(capsys, main, ana_args("--epoch", "1", "--weightOptimizer", "sgd"), only=True)
    assert line.startswith("error: SGD_WEIGHT_LR of config.py: expected a finite number >= 0, got -0.1")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ output locations

def test_check_output_dir_accepts_new_and_existing_folders(tmp_path):
    check_output_dir(tmp_path, "--out")
    check_output_dir(tmp_path / "a" / "b", "--out")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_check_output_dir_refuses_files_and_unwritable_folders(tmp_path, unwritable_dir):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"--out .*f is a file; expected a folder"):
        check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(UserError, match=r"--out .*f/sub lies below .*f, which is a file"):
        check_output_dir(tmp_path / "f" / "sub", "--out")
    with pytest.raises(UserError, match=r"cannot create files in .*; expected a writable folder"):
        check_output_dir(unwritable_dir / "run", "--out")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    with pytest.raises(UserError, match="broken symbolic link"):
        check_output_dir(tmp_path / "dangling" / "run", "--out")
