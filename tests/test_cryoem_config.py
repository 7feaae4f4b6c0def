"""utils.cryoem.config: defaults, YAML < CLI precedence, every validation error, dump/load."""
import argparse
import os
import re
from pathlib import Path

import pytest
import yaml

import train_pu_selective_fixmatch
from utils.cryoem.config import (DEFAULTS, arg_type, default_config, dump_config, load_config, validate_config,
                                 value_at, with_values)
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["pu_selective_fixmatch", "fixmatch_standard", "pu_only"]


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(**given):
    """What the trainer passes to with_values for the flags ``given`` (by their argparse names):
    ``({dotted key: value}, {dotted key: flag})`` (train_pu_selective_fixmatch.CONFIG_FLAGS)."""
    flags = {key: flag for flag, key in train_pu_selective_fixmatch.CONFIG_FLAGS.items()}
    keys = {flag[2:].replace("-", "_"): key for flag, key in train_pu_selective_fixmatch.CONFIG_FLAGS.items()}
    return {keys[name]: value for name, value in given.items()}, flags


# ------------------------------------------------------------------------------- defaults

def test_defaults_are_the_seed_values():
    cfg = default_config()
    assert cfg["loss"]["prior"] == "auto"  # a fixed 0.3 would override the data's estimate (README, CryoEM "Config")
    assert cfg["loss"]["consistency_threshold"] == 0.95
    assert cfg["loss"]["lambda_consistency"] == 1.0
    assert cfg["loss"]["lambda_entropy"] == 0.01
    assert cfg["loss"]["selective"] is True
    assert cfg["model"]["ema_decay"] == 0.999
    assert cfg["model"]["backbone"] == "resnet18"
    assert cfg["model"]["use_ema"] is True
    assert cfg["data"]["batch_ratio"] == [1, 4]
    assert cfg["training"]["batch_size"] == 32
    assert cfg["training"]["rampup_epochs"] == 10
    validate_config(cfg)


def test_defaults_cannot_be_changed_by_callers():
    with pytest.raises(TypeError):
        DEFAULTS["loss"]["prior"] = 0.5
    with pytest.raises(TypeError):
        DEFAULTS["extra"] = {}
    cfg = default_config()
    cfg["loss"]["prior"] = 0.5
    cfg["data"]["batch_ratio"].append(9)
    assert DEFAULTS["loss"]["prior"] == "auto"
    assert default_config()["loss"]["prior"] == "auto"
    assert default_config()["data"]["batch_ratio"] == [1, 4]
    assert load_config(None) == default_config()


# ------------------------------------------------------------------------------ precedence

def test_yaml_overrides_defaults_and_keeps_the_rest(tmp_path):
    path = write(tmp_path, "loss:\n  prior: 0.4\n  lambda_consistency: 2\n"
                           "model:\n  backbone: resnet34\n  use_ema: false\n"
                           "training:\n  learning_rate: 3e-4\n")
    cfg = load_config(path)
    expected = default_config()
    expected["loss"].update(prior=0.4, lambda_consistency=2.0)
    expected["model"].update(backbone="resnet34", use_ema=False)
    expected["training"]["learning_rate"] = 3e-4
    assert cfg == expected
    assert isinstance(cfg["loss"]["lambda_consistency"], float)  # int at a float key -> float


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == default_config()
    assert load_config(write(tmp_path, "# only a comment\n")) == default_config()
    assert load_config(write(tmp_path, "loss:\n  # prior: 0.5\nmodel:\n")) == default_config()


def test_cli_overrides_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "training:\n  batch_size: 16\n  epochs: 5\n  seed: 1\n"
                                      "data:\n  num_workers: 4\n"))
    before = default_config()
    before["training"].update(batch_size=16, epochs=5, seed=1)
    before["data"]["num_workers"] = 4
    new = with_values(cfg, *cli(data_dir=Path("/x/data"), batch_size=64, seed=7,
                               num_workers=0, device="cpu"))
    assert new["data"]["data_dir"] == "/x/data"       # a Path becomes a plain string
    assert new["training"]["batch_size"] == 64
    assert new["training"]["epochs"] == 5             # not given on the command line: YAML's
    assert new["training"]["seed"] == 7
    assert new["data"]["num_workers"] == 0            # 0 is a value, not "not given"
    assert new["training"]["device"] == "cpu"
    assert cfg == before                              # the input config is untouched
    assert with_values(cfg, *cli()) == cfg
    assert with_values(cfg, {}) == cfg  # nothing given
    new["data"]["batch_ratio"].append(3)
    assert cfg["data"]["batch_ratio"] == [1, 4]       # a deep copy


@pytest.mark.parametrize("given, expected", [
    (dict(batch_size=0), "--batch-size: training.batch_size must be an integer >= 1, got 0"),
    (dict(epochs=0), "--epochs: training.epochs must be an integer >= 1, got 0"),
    (dict(num_workers=-1), "--num-workers: data.num_workers must be an integer >= 0, got -1"),
    (dict(seed=-3), "--seed: training.seed must be an integer in [0, 4294967295], got -3"),
    (dict(device="gpu"), "--device: training.device must be auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
    (dict(data_dir=""), "--data-dir: data.data_dir must be a non-empty path string, got ''"),
])
def test_cli_bad_values_name_the_flag(given, expected):
    with pytest.raises(UserError) as info:
        with_values(default_config(), *cli(**given))
    assert str(info.value) == expected



def test_value_at_and_arg_type_follow_the_key():
    cfg = default_config()
    assert value_at(cfg, "loss.prior") == "auto" and value_at(cfg, "training.epochs") == 100
    assert arg_type("training.epochs")("7") == 7
    assert arg_type("loss.prior")("auto") == "auto" and arg_type("loss.prior")("0.2") == 0.2
    assert arg_type("data.data_dir")("x") == "x"
    for key, text in (("training.epochs", "0"), ("training.seed", "-1"), ("training.batch_size", "nan")):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer"):
            arg_type(key)(text)
    with pytest.raises(KeyError):
        value_at(cfg, "loss.pior")


def test_the_parser_defaults_are_the_yaml_values_and_the_command_line_wins(tmp_path):
    path = write(tmp_path, "training:\n  epochs: 5\n  amp: false\nloss:\n  prior: 0.2\n")
    parser = train_pu_selective_fixmatch.build_parser(path)
    args = parser.parse_args([])
    assert (args.epochs, args.amp, args.prior, args.batch_size) == (5, False, 0.2, 32)
    args = parser.parse_args(["--epochs", "9", "--amp", "--prior", "auto"])
    assert (args.epochs, args.amp, args.prior) == (9, True, "auto")
    cfg, spec = train_pu_selective_fixmatch.resolve_settings(["--config", str(path), "--epochs", "9",
                                                              "--output-dir", str(tmp_path), "--resume"])
    assert cfg["training"]["epochs"] == 9 and cfg["training"]["amp"] is False and cfg["loss"]["prior"] == 0.2
    assert spec.run_dir == tmp_path / "cfg" and spec.resume and "--resume" in spec.command


# ------------------------------------------------------------------------------ validation

KNOWN = {
    "data": "data_dir, batch_ratio, val_fraction, test_fraction, num_workers, max_open_chunks",
    "loss": "prior, consistency_threshold, lambda_consistency, lambda_entropy, selective, "
            "nnpu_beta, nnpu_gamma",
    "model": "backbone, pretrained, use_ema, ema_decay, dropout",
    "training": "batch_size, epochs, learning_rate, weight_decay, rampup_epochs, "
                "entropy_start_epoch, entropy_rampup_epochs, grad_clip, early_stopping_patience, "
                "min_lr, seed, device, amp, channels_last, compile, deterministic",
}


@pytest.mark.parametrize("section", list(KNOWN))
def test_unknown_key_in_each_section(tmp_path, section):
    path = write(tmp_path, f"{section}:\n  bogus_key: 1\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: unknown key '{section}.bogus_key' "
                               f"(known keys in '{section}': {KNOWN[section]})")


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = write(tmp_path, "loss:\n  priorr: 0.3\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: unknown key 'loss.priorr' (did you mean 'loss.prior'? "
                               f"known keys in 'loss': {KNOWN['loss']})")


def test_unknown_section(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: 0.1\n")
    with pytest.raises(UserError, match=re.escape(
            f"{path}: unknown section 'optimizer' (known sections: data, loss, model, training)")):
        load_config(path)
    path = write(tmp_path, "los:\n  prior: 0.1\n")
    with pytest.raises(UserError, match=re.escape("unknown section 'los' (did you mean 'loss'?")):
        load_config(path)


BAD_VALUES = [
    # wrong types
    ("loss", "prior", "'0.3'", "loss.prior must be a number in (0, 1) or 'auto' (read from the "
                               "data's metadata), got '0.3'"),
    ("loss", "prior", "true", "loss.prior must be a number in (0, 1) or 'auto'"),
    ("loss", "prior", "auto2", "loss.prior must be a number in (0, 1) or 'auto'"),
    ("loss", "consistency_threshold", "true",
     "loss.consistency_threshold must be a finite number in [0, 1], got true"),
    ("training", "learning_rate", "false", "training.learning_rate must be a finite number > 0, got false"),
    ("training", "batch_size", "true", "training.batch_size must be an integer >= 1, got true"),
    ("training", "epochs", "10.0", "training.epochs must be an integer >= 1, got 10.0"),
    ("training", "epochs", "'10'", "training.epochs must be an integer >= 1, got '10'"),
    ("model", "use_ema", "yes", "model.use_ema must be true or false, got 'yes'"),
    ("model", "use_ema", "'true'", "model.use_ema must be true or false, got 'true'"),
    ("model", "use_ema", "1", "model.use_ema must be true or false, got 1"),
    ("loss", "selective", "off", "loss.selective must be true or false, got 'off'"),
    ("model", "pretrained", "null", "model.pretrained must be true or false, got null"),
    ("model", "backbone", "resnet101",
     "model.backbone must be one of resnet18, resnet34, resnet50, got 'resnet101'"),
    ("model", "backbone", "[resnet18]", "model.backbone must be one of resnet18, resnet34, resnet50"),
    ("training", "device", "cuda0", "training.device must be auto, cpu, mps, cuda or cuda:N"),
    ("data", "data_dir", "null", "data.data_dir must be a non-empty path string, got null"),
    ("data", "data_dir", "12", "data.data_dir must be a non-empty path string, got 12"),
    # batch_ratio
    ("data", "batch_ratio", "[1, 0]", "data.batch_ratio must be a list of two positive integers "
                                      "[positives, unlabelled], got [1, 0]"),
    ("data", "batch_ratio", "[1, 4, 2]", "data.batch_ratio must be a list of two positive integers"),
    ("data", "batch_ratio", "[1.5, 4]", "data.batch_ratio must be a list of two positive integers"),
    ("data", "batch_ratio", "[true, 4]", "data.batch_ratio must be a list of two positive integers"),
    ("data", "batch_ratio", "4", "data.batch_ratio must be a list of two positive integers"),
    ("data", "batch_ratio", "'1:4'", "data.batch_ratio must be a list of two positive integers"),
    # out of range
    ("loss", "prior", "1.5", "loss.prior must be a number in (0, 1) or 'auto' (read from the "
                             "data's metadata), got 1.5"),
    ("loss", "prior", "0", "loss.prior must be a number in (0, 1)"),
    ("loss", "prior", "1", "loss.prior must be a number in (0, 1)"),
    ("loss", "prior", ".nan", "loss.prior must be a number in (0, 1)"),
    ("loss", "consistency_threshold", "1.01", "loss.consistency_threshold must be a finite number in [0, 1]"),
    ("loss", "consistency_threshold", "-0.1", "loss.consistency_threshold must be a finite number in [0, 1]"),
    ("loss", "lambda_consistency", "-1", "loss.lambda_consistency must be a finite number >= 0, got -1"),
    ("loss", "lambda_entropy", "-0.01", "loss.lambda_entropy must be a finite number >= 0"),
    ("loss", "lambda_entropy", ".inf", "loss.lambda_entropy must be a finite number >= 0, got inf"),
    ("loss", "nnpu_beta", "-0.1", "loss.nnpu_beta must be a finite number >= 0"),
    ("loss", "nnpu_gamma", "1.5", "loss.nnpu_gamma must be a finite number in [0, 1]"),
    ("model", "ema_decay", "1.0", "model.ema_decay must be a finite number in [0, 1), got 1.0"),
    ("model", "ema_decay", "-0.5", "model.ema_decay must be a finite number in [0, 1)"),
    ("model", "dropout", "1", "model.dropout must be a finite number in [0, 1), got 1"),
    ("training", "learning_rate", "0", "training.learning_rate must be a finite number > 0, got 0"),
    ("training", "weight_decay", "-1e-4", "training.weight_decay must be a finite number >= 0"),
    ("training", "epochs", "0", "training.epochs must be an integer >= 1, got 0"),
    ("training", "batch_size", "0", "training.batch_size must be an integer >= 1, got 0"),
    ("training", "early_stopping_patience", "-1",
     "training.early_stopping_patience must be an integer >= 0, got -1"),
    ("training", "rampup_epochs", "-1", "training.rampup_epochs must be an integer >= 0"),
    ("training", "entropy_start_epoch", "-2", "training.entropy_start_epoch must be an integer >= 0"),
    ("training", "entropy_rampup_epochs", "2.5", "training.entropy_rampup_epochs must be an integer"),
    ("training", "grad_clip", "-1", "training.grad_clip must be a finite number >= 0, got -1"),
    ("training", "min_lr", "-1", "training.min_lr must be a finite number >= 0"),
    ("training", "seed", "-1", "training.seed must be an integer in [0, 4294967295]"),
    ("data", "val_fraction", "1.0", "data.val_fraction must be a finite number in [0, 1), got 1.0"),
    ("data", "test_fraction", "-0.1", "data.test_fraction must be a finite number in [0, 1)"),
    ("data", "num_workers", "-1", "data.num_workers must be an integer >= 0, got -1"),
    ("data", "max_open_chunks", "0", "data.max_open_chunks must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("section, key, value, expected", BAD_VALUES,
                         ids=[f"{s}.{k}={v}" for s, k, v, _ in BAD_VALUES])
def test_bad_value_names_file_and_key(tmp_path, section, key, value, expected):
    path = write(tmp_path, f"{section}:\n  {key}: {value}\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message


def test_cross_key_checks(tmp_path):
    path = write(tmp_path, "data:\n  val_fraction: 0.5\n  test_fraction: 0.5\n")
    with pytest.raises(UserError, match=re.escape(
            f"{path}: data.val_fraction + data.test_fraction must be < 1")):
        load_config(path)
    load_config(write(tmp_path, "data:\n  val_fraction: 0.45\n  test_fraction: 0.5\n"))
    path = write(tmp_path, "training:\n  learning_rate: 0.001\n  min_lr: 0.01\n")
    with pytest.raises(UserError, match=re.escape(
            f"{path}: training.min_lr (0.01) must be <= training.learning_rate (0.001)")):
        load_config(path)


@pytest.mark.parametrize("text, value", [
    ("loss:\n  prior: auto\n", "auto"),
    ("loss:\n  prior: 0.05\n", 0.05),
    ("loss:\n  prior: 1e-2\n", 0.01),         # YAML 1.2 float; PyYAML alone reads a string
])
def test_good_prior_values(tmp_path, text, value):
    assert load_config(write(tmp_path, text))["loss"]["prior"] == value


def test_boundary_values_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, (
        "loss:\n  consistency_threshold: 1\n  lambda_consistency: 0\n  lambda_entropy: 0\n"
        "  nnpu_gamma: 0\nmodel:\n  ema_decay: 0\n  dropout: 0\n"
        "training:\n  early_stopping_patience: 0\n  grad_clip: 0\n  rampup_epochs: 0\n"
        "  device: cuda:1\ndata:\n  num_workers: 0\n  val_fraction: 0\n  test_fraction: 0\n"
        "  batch_ratio: [3, 1]\n")))
    assert cfg["loss"]["consistency_threshold"] == 1.0
    assert cfg["training"]["device"] == "cuda:1"
    assert cfg["data"]["batch_ratio"] == [3, 1]


@pytest.mark.parametrize("text, expected", [
    ("- data\n- loss\n", "the top level must be a mapping of sections (data, loss, model, training), got list"),
    ("just words\n", "the top level must be a mapping of sections (data, loss, model, training), got str"),
    ("loss: 0.3\n", "section 'loss' must be a mapping of keys, got 0.3"),
    ("model:\n  - resnet18\n", "section 'model' must be a mapping of keys, got ['resnet18']"),
    ("loss:\n  prior: [0.3\n", "not valid YAML at line 3, column 1"),
    ("loss:\n  prior: 0.3\n   lambda_entropy: 0.1\n", "not valid YAML at line 3"),
    ("loss:\n  prior: 0.3\n  prior: 0.4\n", "not valid YAML at line 3, column 3 (key 'prior' appears twice"),
    ("loss: {prior: 0.3}\nloss: {prior: 0.4}\n", "not valid YAML at line 2, column 1 (key 'loss' appears twice"),
])
def test_malformed_files(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_directory_and_binary_file(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"config file {tmp_path / 'nope.yaml'} does not exist")):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a directory, not a file"):
        load_config(tmp_path)
    binary = tmp_path / "weights.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=re.escape(f"{binary}: not a YAML config (not UTF-8 text)")):
        load_config(binary)


def test_validate_config_on_dicts():
    validate_config(default_config())
    cfg = default_config()
    cfg["loss"]["prior"] = 2.0
    with pytest.raises(UserError) as info:
        validate_config(cfg)
    assert str(info.value).startswith("loss.prior must be")  # no source: no prefix
    with pytest.raises(UserError, match=r"^run.yaml: loss.prior must be"):
        validate_config(cfg, source="run.yaml")
    cfg = default_config()
    del cfg["model"]["dropout"]
    with pytest.raises(UserError, match=r"^missing key 'model.dropout'$"):
        validate_config(cfg)
    cfg = default_config()
    del cfg["training"]
    with pytest.raises(UserError, match=r"^missing section 'training'$"):
        validate_config(cfg)
    cfg = default_config()
    cfg["model"] = None
    with pytest.raises(UserError, match=r"^section 'model' must be a mapping of keys, got null$"):
        validate_config(cfg)
    with pytest.raises(UserError, match="the config must be a mapping of sections"):
        validate_config([1, 2])
    cfg = default_config()
    cfg["data"]["batch_ratio"] = (2, 8)                  # a tuple is fine in code
    validate_config(cfg)


# --------------------------------------------------------------------------- repo configs

def yaml_text(name):
    return (REPO / "configs" / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", CONFIGS)
def test_repo_configs_load_and_validate(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    validate_config(cfg)
    # each file spells out every key, so a run's config never depends on hidden defaults
    raw = yaml.safe_load(yaml_text(name))
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in DEFAULTS.items()}


def test_main_config_is_the_seed_setup_and_comparisons_differ_in_their_keys():
    main = load_config(REPO / "configs" / "pu_selective_fixmatch.yaml")
    assert main == default_config()

    standard = load_config(REPO / "configs" / "fixmatch_standard.yaml")
    expected = default_config()
    expected["loss"]["selective"] = False
    assert standard == expected

    pu_only = load_config(REPO / "configs" / "pu_only.yaml")
    expected = default_config()
    expected["loss"].update(lambda_consistency=0.0, lambda_entropy=0.0)
    assert pu_only == expected


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_in_the_repo_configs_is_commented(name):
    lines = yaml_text(name).splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s+\w+:", line):  # a key inside a section
            comment_above = any(lines[j].strip().startswith("#")
                                for j in range(max(0, i - 3), i)
                                if lines[j].startswith("  "))
            assert comment_above or "#" in line, f"{name}.yaml line {i + 1} has no comment: {line}"


# --------------------------------------------------------------------------------- dumping

def test_dump_and_load_round_trip(tmp_path):
    cfg = default_config()
    cfg["loss"].update(prior="auto", consistency_threshold=0.9)
    cfg["data"].update(data_dir=str(tmp_path / "données"), batch_ratio=[2, 7])
    cfg["training"].update(learning_rate=3e-5, min_lr=1e-7, device="cuda:0")
    cfg["model"]["use_ema"] = False
    path = tmp_path / "run" / "config.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == cfg  # plain YAML readers agree
    text = path.read_text(encoding="utf-8")
    assert "batch_ratio: [2, 7]" in text
    order = [line.split(":")[0] for line in text.splitlines() if re.match(r"^\w", line)]
    assert order == ["data", "loss", "model", "training"]            # not sorted
    assert [p for p in os.listdir(path.parent)] == ["config.yaml"]   # no temporary file left


def test_dump_overwrites_atomically_and_accepts_tuples_and_paths(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    cfg = default_config()
    cfg["data"]["batch_ratio"] = (1, 3)
    cfg["data"]["data_dir"] = tmp_path / "data"
    dump_config(cfg, path)
    loaded = load_config(path)
    assert loaded["data"]["batch_ratio"] == [1, 3]
    assert loaded["data"]["data_dir"] == str(tmp_path / "data")
    assert cfg["data"]["batch_ratio"] == (1, 3)                      # the input is untouched


def test_cli_result_round_trips(tmp_path):
    cfg = with_values(load_config(REPO / "configs" / "pu_only.yaml"),
                      *cli(data_dir=tmp_path, epochs=2, device="cpu"))
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


FLOAT_KEYS = [("data", "val_fraction"), ("data", "test_fraction"), ("loss", "prior"),
              ("loss", "consistency_threshold"), ("loss", "lambda_consistency"), ("loss", "lambda_entropy"),
              ("loss", "nnpu_beta"), ("loss", "nnpu_gamma"), ("model", "ema_decay"), ("model", "dropout"),
              ("training", "learning_rate"), ("training", "weight_decay"), ("training", "grad_clip"),
              ("training", "min_lr")]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("section, key", FLOAT_KEYS, ids=[f"{s}.{k}" for s, k in FLOAT_KEYS])
def test_every_float_key_refuses_non_finite_values(tmp_path, section, key, value):
    path = write(tmp_path, f"{section}:\n  {key}: {value}\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {section}\.{key} must be a (finite )?number"):
        load_config(path)


def test_the_float_key_list_is_complete():
    from utils.cryoem.config import _CHECKS
    floats = {(s, k) for s, checks in _CHECKS.items() for k, c in checks.items() if getattr(c, "kind", "") == "float"}
    assert floats | {("loss", "prior")} == set(FLOAT_KEYS)
