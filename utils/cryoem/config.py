"""Configuration of the CryoEM PU + Selective FixMatch trainer: defaults < YAML < command line.

A config is a nested dict with four sections (``data``, ``loss``, ``model``, ``training``).
:data:`DEFAULTS` holds the method's default settings (README, "Config"); ``load_config(path)`` reads a YAML file,
checks it and merges it over the defaults; ``with_values(cfg, {"training.epochs": 5})`` lets the
few command-line flags win (their parser defaults are the YAML values, see
train_pu_selective_fixmatch.py); ``dump_config`` writes the resolved config beside a run's outputs.

Every bad value is a :class:`~utils.errors.UserError` of one line that names the file and the
dotted key (``configs/x.yaml: loss.prior must be a number in (0, 1) or 'auto', got 1.5``).
The checks are strict on purpose: a string is not a boolean (the file is read with YAML 1.2
scalars, so ``use_ema: yes`` is the string 'yes' and an error, not a silent true), a boolean is
not a number, and a float is not an integer. Integers are accepted where a float is expected
and stored as floats; ``1e-3`` is read as a number.
"""
import argparse
import copy
import difflib
import os
import re
from pathlib import Path
from types import MappingProxyType

import yaml

from utils.checks import SEED_MAX, expected_text, float_arg, int_arg, not_a_file, range_problem
from utils.errors import UserError
from utils.io import atomic_write

BACKBONES = ("resnet18", "resnet34", "resnet50")


def _freeze(tree):
    """Read-only view of a nested dict: mappings become ``MappingProxyType``, lists tuples."""
    if isinstance(tree, dict):
        return MappingProxyType({k: _freeze(v) for k, v in tree.items()})
    if isinstance(tree, list):
        return tuple(tree)
    return tree


def _thaw(tree):
    """Plain, independent copy of a (possibly frozen) config: dicts, lists, scalars."""
    if isinstance(tree, (dict, MappingProxyType)):
        return {k: _thaw(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_thaw(v) for v in tree]
    if isinstance(tree, os.PathLike):
        return os.fspath(tree)
    return copy.deepcopy(tree)


# The method's default settings (README, "Config"). Read-only: it is a
# MappingProxyType tree, so no caller can change the defaults another caller sees; use
# default_config() for a mutable copy.
DEFAULTS = _freeze({
    "data": {
        "data_dir": "./data/cryoem",
        "batch_ratio": [1, 4],
        "val_fraction": 0.1,
        "test_fraction": 0.1,
        "num_workers": 2,
        "max_open_chunks": 4,
    },
    "loss": {
        # the data's own estimate (metadata.prior, written by preprocess_cryoem.py); a fixed 0.3
        # overrode it silently (0.085 on EMPIAR-10017), see utils/cryoem/prior.py
        "prior": "auto",
        "consistency_threshold": 0.95,
        "lambda_consistency": 1.0,
        "lambda_entropy": 0.01,
        "selective": True,
        "nnpu_beta": 0.0,
        "nnpu_gamma": 1.0,
    },
    "model": {
        "backbone": "resnet18",
        "pretrained": False,
        "use_ema": True,
        "ema_decay": 0.999,
        "dropout": 0.2,
    },
    "training": {
        "batch_size": 32,
        "epochs": 100,
        "learning_rate": 1e-3,
        "weight_decay": 1e-4,
        "rampup_epochs": 10,
        "entropy_start_epoch": 10,
        "entropy_rampup_epochs": 10,
        "grad_clip": 1.0,
        "early_stopping_patience": 15,
        "min_lr": 0.0,
        "seed": 42,
        "device": "auto",
        "amp": True,
        "channels_last": True,
        "compile": False,
        "deterministic": False,
    },
})


def default_config():
    """A fresh, mutable deep copy of :data:`DEFAULTS` (plain dicts and lists)."""
    return _thaw(DEFAULTS)


# ---------------------------------------------------------------------------------------------
# Value checks. Each returns None when the value is good, else the text after the key name.

def _show(value):
    """A value as the user wrote it in YAML: null, true/false, 'text', numbers as is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _ranged(integer, **bounds):
    """Check for a finite number (an integer when ``integer``) in the range of ``bounds``
    (utils.checks.range_problem, the checker of every command's numeric flags)."""
    expected = expected_text(integer, **bounds)

    def check(value):
        return None if range_problem(value, integer, **bounds) is None else f"must be {expected}, got {_show(value)}"

    check.kind = "int" if integer else "float"
    check.bounds = dict(integer=integer, **bounds)
    return check


def _number(low=None, high=None, low_open=False, high_open=False):
    """Check for a finite number in the interval given by ``low``/``high`` (None = unbounded)."""
    return _ranged(False, low=low, high=high, low_open=low_open, high_open=high_open)


def _integer(low, high=None):
    return _ranged(True, low=low, high=high)


def _boolean(value):
    return None if isinstance(value, bool) else f"must be true or false, got {_show(value)}"


def _choice(options):
    def check(value):
        if isinstance(value, str) and value in options:
            return None
        return f"must be one of {', '.join(options)}, got {_show(value)}"

    return check


def _path(value):
    if isinstance(value, (str, os.PathLike)) and os.fspath(value).strip():
        return None
    return f"must be a non-empty path string, got {_show(value)}"


def _prior(value):
    bad = _number(0, 1, low_open=True, high_open=True)(value)
    if bad is None or value == "auto":
        return None
    return f"must be a number in (0, 1) or 'auto' (read from the data's metadata), got {_show(value)}"


def _batch_ratio(value):
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(_is_int(v) and v >= 1 for v in value)):
        return None
    return f"must be a list of two positive integers [positives, unlabelled], got {_show(value)}"


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value):
    if isinstance(value, str) and _DEVICE.fullmatch(value):
        return None
    return f"must be auto, cpu, mps, cuda or cuda:N, got {_show(value)}"


# section -> key -> check. Key order = the order of DEFAULTS (and of the error's key lists).
_CHECKS = MappingProxyType({
    "data": MappingProxyType({
        "data_dir": _path,
        "batch_ratio": _batch_ratio,
        "val_fraction": _number(0, 1, high_open=True),
        "test_fraction": _number(0, 1, high_open=True),
        "num_workers": _integer(0),
        "max_open_chunks": _integer(1),
    }),
    "loss": MappingProxyType({
        "prior": _prior,
        "consistency_threshold": _number(0, 1),
        "lambda_consistency": _number(0),
        "lambda_entropy": _number(0),
        "selective": _boolean,
        "nnpu_beta": _number(0),
        "nnpu_gamma": _number(0, 1),
    }),
    "model": MappingProxyType({
        "backbone": _choice(BACKBONES),
        "pretrained": _boolean,
        "use_ema": _boolean,
        "ema_decay": _number(0, 1, high_open=True),
        "dropout": _number(0, 1, high_open=True),
    }),
    "training": MappingProxyType({
        "batch_size": _integer(1),
        "epochs": _integer(1),
        "learning_rate": _number(0, low_open=True),
        "weight_decay": _number(0),
        "rampup_epochs": _integer(0),
        "entropy_start_epoch": _integer(0),
        "entropy_rampup_epochs": _integer(0),
        "grad_clip": _number(0),
        "early_stopping_patience": _integer(0),
        "min_lr": _number(0),
        "seed": _integer(0, SEED_MAX),
        "device": _device,
        "amp": _boolean,
        "channels_last": _boolean,
        "compile": _boolean,
        "deterministic": _boolean,
    }),
})


def _prefix(source):
    return f"{source}: " if source else ""


def _unknown_key(section, key, source):
    known = list(_CHECKS[section])
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean '{section}.{close[0]}'? " if close else ""
    return UserError(f"{_prefix(source)}unknown key '{section}.{key}' "
                     f"({hint}known keys in '{section}': {', '.join(known)})")


def _unknown_section(section, source):
    known = list(_CHECKS)
    close = difflib.get_close_matches(str(section), known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return UserError(f"{_prefix(source)}unknown section '{section}' "
                     f"({hint}known sections: {', '.join(known)})")


def validate_config(cfg, source=None):
    """Check a complete config; raise :class:`UserError` naming ``source`` and the dotted key.

    Checks: the four sections and only them, each a mapping holding exactly the known keys;
    each value's type and range (see ``_CHECKS``); and across keys
    ``val_fraction + test_fraction < 1`` and ``min_lr <= learning_rate``. ``source`` (a file
    name or "command line") starts the message when given. Returns None.
    """
    if not isinstance(cfg, dict):
        raise UserError(f"{_prefix(source)}the config must be a mapping of sections "
                        f"({', '.join(_CHECKS)}), got {type(cfg).__name__}")
    for section in cfg:
        if section not in _CHECKS:
            raise _unknown_section(section, source)
    for section, checks in _CHECKS.items():
        if section not in cfg:
            raise UserError(f"{_prefix(source)}missing section '{section}'")
        values = cfg[section]
        if not isinstance(values, dict):
            raise UserError(f"{_prefix(source)}section '{section}' must be a mapping of keys, "
                            f"got {_show(values)}")
        for key in values:
            if key not in checks:
                raise _unknown_key(section, key, source)
        for key, check in checks.items():
            if key not in values:
                raise UserError(f"{_prefix(source)}missing key '{section}.{key}'")
            problem = check(values[key])
            if problem:
                raise UserError(f"{_prefix(source)}{section}.{key} {problem}")
    data, training = cfg["data"], cfg["training"]
    if data["val_fraction"] + data["test_fraction"] >= 1:
        raise UserError(f"{_prefix(source)}data.val_fraction + data.test_fraction must be < 1 "
                        f"(something must be left to train on), got "
                        f"{data['val_fraction']:g} + {data['test_fraction']:g}")
    if training["min_lr"] > training["learning_rate"]:
        raise UserError(f"{_prefix(source)}training.min_lr ({training['min_lr']:g}) must be "
                        f"<= training.learning_rate ({training['learning_rate']:g})")


def _normalise(cfg):
    """After validation: ints at float keys become floats, batch_ratio a list, paths strings."""
    for section, checks in _CHECKS.items():
        for key, check in checks.items():
            value = cfg[section][key]
            if getattr(check, "kind", None) == "float" and _is_int(value):
                cfg[section][key] = float(value)
            elif isinstance(value, (tuple, os.PathLike)):
                cfg[section][key] = _thaw(value)
    return cfg


# ---------------------------------------------------------------------------------------------
# YAML

class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and no silent duplicates.

    ``1e-3`` is a float (PyYAML's YAML 1.1 rules make it a string), only true/false are
    booleans (``yes``/``no``/``on``/``off`` stay strings and are then rejected by the checks),
    and a key given twice in one mapping is an error instead of the last one winning.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            try:
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 booleans: only true/false (PyYAML's 1.1 rules also read yes/no/on/off as booleans,
# so "device: off" or "backbone: no" would silently change type).
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_config(path):
    """Read a YAML config, check it, and return it merged over the defaults (a new dict).

    ``path`` None or an empty file gives the defaults. A section may list only some of its
    keys; the others keep their defaults. Missing file, unreadable text, YAML syntax errors,
    a top level or section that is not a mapping, unknown sections or keys, and bad values
    are :class:`UserError` naming the file.
    """
    cfg = default_config()
    if path is None:
        return cfg
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else not_a_file(path)
        raise UserError(f"config file {path} {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a YAML config (not UTF-8 text)") from None
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}: not valid YAML{where} ({problem})") from None
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections "
                        f"({', '.join(_CHECKS)}), got {type(raw).__name__} {_show(raw)[:60]}")
    for section, values in raw.items():
        if section not in _CHECKS:
            raise _unknown_section(section, path)
        if values is None:  # "loss:" with every key commented out
            continue
        if not isinstance(values, dict):
            raise UserError(f"{path}: section '{section}' must be a mapping of keys, "
                            f"got {_show(values)[:60]}")
        for key, value in values.items():
            if key not in _CHECKS[section]:
                raise _unknown_key(section, key, path)
            cfg[section][key] = value
    validate_config(cfg, source=path)
    return _normalise(cfg)


def _section_key(key):
    """``("loss", "prior")`` of the dotted ``key`` "loss.prior"; an unknown key is a programming error."""
    section, _, name = key.partition(".")
    if section not in _CHECKS or name not in _CHECKS[section]:
        raise KeyError(f"no config key {key!r}")
    return section, name


def value_at(cfg, key):
    """The value of the dotted ``key`` ("training.epochs") in ``cfg``."""
    section, name = _section_key(key)
    return cfg[section][name]


def prior_arg(text):
    """``auto`` or a number (argparse type of loss.prior; the range is checked with the config)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1) or auto, got {text!r}") from None


def arg_type(key):
    """The argparse ``type=`` of a command-line flag that sets the dotted ``key``: the key's own
    range for numbers (``--epochs 0`` fails at parse time), :func:`prior_arg` for loss.prior,
    ``str`` otherwise (booleans are ``BooleanOptionalAction`` flags and need none)."""
    section, name = _section_key(key)
    check = _CHECKS[section][name]
    bounds = getattr(check, "bounds", None)
    if bounds is None:
        return prior_arg if check is _prior else str
    bounds = dict(bounds)
    if bounds.pop("integer"):
        return int_arg(bounds["low"], bounds["high"])
    return float_arg(**bounds)


def with_values(cfg, overrides, flags=None):
    """Return a new config where ``overrides`` ({dotted key: value}) replace ``cfg``'s values.

    A bad value is a :class:`UserError` naming the key, after the flag that gave it when
    ``flags`` ({dotted key: flag as the user typed it}) has one. ``cfg`` is not modified.
    """
    new = _thaw(cfg)
    flags = flags or {}
    for key, value in overrides.items():
        section, name = _section_key(key)
        problem = _CHECKS[section][name](value)
        if problem:
            flag = flags.get(key)
            raise UserError(f"{flag + ': ' if flag else ''}{key} {problem}")
        new[section][name] = value
    validate_config(new, source="command line")
    return _normalise(new)


def dump_config(cfg, path):
    """Write ``cfg`` as YAML to ``path`` atomically (sections and keys in their given order).

    What :func:`load_config` reads back from the file equals ``cfg`` when ``cfg`` is valid.
    """
    plain = _thaw(cfg)

    def write(f):
        f.write(b"# Resolved configuration of this run (defaults < YAML file < command line).\n")
        yaml.safe_dump(plain, f, sort_keys=False, default_flow_style=None, allow_unicode=True,
                       encoding="utf-8")

    atomic_write(path, write)
