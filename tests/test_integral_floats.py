"""Integral floats where the schema wants an integer: `seed: 7.0` (YAML, a hand-edited file, the
string "7.0" Snakemake's --config passes, 1e3) is the integer 7, giving the same validated config and
so the same stage fingerprints and results; 7.5 is refused in one line naming the key and the value.
Every integer key of the schema is checked (found by walking the schema, not listed by hand), and the
CLI's integer options refuse "2.0" as argparse does (usage, one error line, exit 2; no traceback)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import error_line, run_cli, toy_rows, write_config, write_csv
from ptm_mamba.config import load_schema, validate
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import split_paths
from ptm_mamba.settings import Settings
from ptm_mamba.stages import DEPENDS_ON, stage_fingerprint, stage_settings


def _types(schema: dict) -> set[str]:
    kind = schema.get("type", ())
    return {kind} if isinstance(kind, str) else set(kind)


def integer_keys(schema: dict, prefix: tuple = ()) -> list[tuple[tuple, dict, bool]]:
    """(path, schema, is an array item) of every place the schema wants an integer: nested
    sections, [integer, "null"] keys and integer items of arrays."""
    found = []
    for key, sub in schema.get("properties", {}).items():
        path = (*prefix, key)
        if "integer" in _types(sub):
            found.append((path, sub, False))
        if "integer" in _types(sub.get("items", {})):
            found.append((path, sub["items"], True))
        found += integer_keys(sub, path)
    return found


INTEGER_KEYS = integer_keys(load_schema())


def test_the_schema_walk_finds_the_integer_keys():
    names = {".".join(path) for path, _, _ in INTEGER_KEYS}
    assert {"seed", "dataset.split_seed", "esm.repr_layer", "embedding.batch_size", "model.ssm_cfg.d_state",
            "training.max_steps", "embedding.window"} <= names
    assert "training.lr" not in names and "dataset.val_size" not in names  # numbers stay numbers
    assert len(names) >= 20


def a_value(schema: dict) -> int:
    """An integer the key takes (its default where that is one, else its lowest allowed value)."""
    default = schema.get("default")
    if isinstance(default, int) and not isinstance(default, bool):
        return default
    if "minimum" in schema:
        return schema["minimum"]
    return schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else 1


def with_value(base: dict, path: tuple, value, item: bool, schema: dict) -> dict:
    config = copy.deepcopy(base)
    node = config
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = [value] * max(1, schema.get("minItems", 1)) if item else value
    return config


@pytest.fixture
def base(tmp_path: Path) -> dict:
    data = write_csv(tmp_path / "data.csv", toy_rows())
    return {"dataset": {"dataset_location": str(data), "val_size": 3, "test_size": 3}}


def dumped(config: dict) -> str:
    """The validated config as JSON: 7 and 7.0 differ here (they are == in Python)."""
    return json.dumps(config, sort_keys=True)


@pytest.mark.parametrize("path, schema, item", INTEGER_KEYS, ids=[".".join(p) for p, _, _ in INTEGER_KEYS])
def test_an_integral_float_is_the_same_integer(base, path, schema, item):
    value = a_value(schema)
    as_int = validate(with_value(base, path, value, item, schema))
    for same in (float(value), f"{value}.0", f"{float(value):e}", str(float(value))):  # 7.0, "7.0", "7.000000e+00"
        config = validate(with_value(base, path, same, item, schema))
        assert dumped(config) == dumped(as_int), (path, same)
        for stage in DEPENDS_ON:
            assert stage_fingerprint(Settings.from_config(config), stage) == \
                stage_fingerprint(Settings.from_config(as_int), stage), (path, same, stage)
    node = as_int
    for part in path:
        node = node[part]
    assert type(node[0] if item else node) is int


@pytest.mark.parametrize("path, schema, item", INTEGER_KEYS, ids=[".".join(p) for p, _, _ in INTEGER_KEYS])
def test_a_non_integral_number_is_refused_in_one_line(base, path, schema, item):
    key = ".".join(path) + (".0" if item else "")
    for bad, shown in ((a_value(schema) + 0.5, repr(a_value(schema) + 0.5)), (f"{a_value(schema)}.5", None)):
        with pytest.raises(PipelineError) as err:
            validate(with_value(base, path, bad, item, schema), source="c.yaml")
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"c.yaml: {key}: "), message
        assert (shown or repr(bad)) in message and "is not an integer" in message, message


def test_exponent_forms_of_integers(base):
    config = validate({**base, "seed": "1e3", "training": {"max_steps": 1.0e3, "log_steps": "2E1"}})
    assert (config["seed"], config["training"]["max_steps"], config["training"]["log_steps"]) == (1000, 1000, 20)
    assert all(type(v) is int for v in (config["seed"], config["training"]["max_steps"]))


def test_yaml_seed_7_0_and_7_are_the_same_run(tmp_path: Path, base):
    """Through a YAML file, as a user writes it: the same train and split settings."""
    from ptm_mamba.config import load_config
    from ptm_mamba.stages import SPLIT, TRAIN

    texts = {name: yaml.safe_dump(base) + f"seed: {seed}\n" for name, seed in (("int", "7"), ("float", "7.0"))}
    configs = {}
    for name, text in texts.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        configs[name] = load_config(tmp_path / f"{name}.yaml")
    assert configs["float"]["seed"] == 7 and type(configs["float"]["seed"]) is int
    settings = {name: Settings.from_config(config) for name, config in configs.items()}
    assert stage_settings(settings["float"], TRAIN) == stage_settings(settings["int"], TRAIN)
    assert stage_fingerprint(settings["float"], SPLIT) == stage_fingerprint(settings["int"], SPLIT)


def test_split_seed_42_0_through_the_cli_makes_the_same_split(tmp_path: Path, base):
    outputs = {}
    for name, seed in (("int", 42), ("float", 42.0)):
        config = write_config(tmp_path / f"{name}.yaml", dataset={**base["dataset"], "split_seed": seed})
        assert f"split_seed: {seed}\n" in config.read_text()
        result = run_cli("split", "--config", config, "--output_dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
        outputs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}
    assert outputs["float"] == outputs["int"]
    assert {path.name for path in split_paths("").values()} <= set(outputs["int"])


def test_seed_7_5_through_the_cli_is_one_line(tmp_path: Path, base):
    config = write_config(tmp_path / "c.yaml", seed=7.5, **base)
    error_line(run_cli("split", "--config", config, "--output_dir", tmp_path / "out"),
               str(config), "seed: 7.5 is not an integer")
    config = write_config(tmp_path / "d.yaml", dataset={**base["dataset"], "split_seed": 42.5})
    error_line(run_cli("split", "--config", config, "--output_dir", tmp_path / "out"),
               "dataset.split_seed: 42.5 is not an integer")
    assert not (tmp_path / "out").exists()


def integer_options() -> list[tuple[str, str]]:
    """(subcommand, option) of every CLI option argparse converts with int."""
    from ptm_mamba.cli import build_parser

    found = []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.type is int:
                found.append((command, action.option_strings[0]))
    return found


def test_the_cli_has_integer_options():
    options = set(integer_options())
    assert {("embed-shard", "--shard"), ("embed-shard", "--num_shards"), ("predict", "--max_tokens_per_batch"),
            ("import-original", "--esm_repr_layer"), ("split", "--threads"), ("embed", "--batch_size")} <= options


@pytest.mark.parametrize("command, option", integer_options())
def test_a_float_for_an_integer_option_is_argparses_usage_error(command, option):
    """argparse refuses "2.0" for type=int: its usage and one error line naming the option and the
    value, exit 2, never a traceback (an integral float is not taken as an integer on the command line)."""
    result = run_cli(command, option, "2.0")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"ptm-mamba {command}: error: argument {option}"), result.stderr
    assert errors[0].endswith("invalid int value: '2.0'"), result.stderr
