"""The pipeline's one config: load YAML, fill defaults and validate against the schema.

The schema lives in ``workflow/schemas/config.schema.yaml``; the Snakefile
(``workflow/rules/common.smk``) validates with this module and that file, so a
config that passes one passes the other. Errors name the file, the key and the
value. The schema is also the one place of defaults (:func:`schema_default`).

Config files are read strictly (a key given twice is an error), and values that
arrive as strings where the schema wants numbers, booleans, null, lists or
sections (``--config 'training={lr: 0.1}'``, YAML 1.1's ``lr: 1e-3``) are
converted first. Where the schema wants an integer, an integral float (``seed: 7.0``,
``"7.0"``, ``1e3``) is that integer, and any other number is refused.

A sweep's ``runs:`` (run name -> overrides of seed, training.* and model.*) is checked here too: each
run's config (:func:`run_config`: the top level with its overrides) must pass the schema, and may not
change a key of a stage the runs share (``stages.DEPENDS_ON``).
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import PipelineError
from .layout import edited_invocation_config

if TYPE_CHECKING:
    from .settings import Settings

_PACKAGE_SCHEMA = Path(__file__).parent / "schemas" / "config.schema.yaml"
_REPO_SCHEMA = Path(__file__).parent.parent / "workflow" / "schemas" / "config.schema.yaml"


def schema_path() -> Path:
    """The schema file: the repository's copy, or the one packaged with a wheel."""
    return _REPO_SCHEMA if _REPO_SCHEMA.exists() else _PACKAGE_SCHEMA


def load_schema() -> dict:
    with open(schema_path(), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@functools.cache
def _schema_for_defaults() -> dict:
    """The schema, read once per process for :func:`schema_default` (which only reads it)."""
    return load_schema()


def schema_entry(key: str) -> dict:
    """The schema of a dotted key (``"predict.max_tokens_per_batch"``): its type, bounds, default."""
    node = _schema_for_defaults()
    for part in key.split("."):
        node = node["properties"][part]
    return copy.deepcopy(node)


def schema_default(key: str) -> Any:
    """The schema's default of a dotted key: the one place where defaults live, for code that runs
    without a config (the predict CLI, the model's API)."""
    return schema_entry(key)["default"]


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"line {line}: duplicate key {key!r} (first at line {first})")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the parent class reports it
            line = key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKey(key, line, first[key])
            first[key] = line
        return super().construct_mapping(node, deep)


def load_yaml_strict(path: str | os.PathLike) -> Any:
    """A YAML file's content (as ``yaml.safe_load``), refusing duplicate keys at any level.

    Raises :class:`PipelineError` naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_StrictLoader)
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except _DuplicateKey as exc:
        raise PipelineError(f"{path} {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None


def _fill_defaults(instance: Any, schema: dict) -> None:
    """Set schema defaults for missing keys, recursively (as snakemake's validate does)."""
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub)


_NULLS = ("null", "~", "none")
_BOOLEANS = {"true": True, "yes": True, "false": False, "no": False}


def _types(schema: dict) -> set[str]:
    kind = schema.get("type", ())
    return {kind} if isinstance(kind, str) else set(kind)


def _parse_scalar(text: str, types: set[str]) -> Any:
    """``text`` as the null, boolean or number that ``types`` allows, else ``text`` itself."""
    word = text.strip().lower()
    if "null" in types and word in _NULLS:
        return None
    if "boolean" in types and word in _BOOLEANS:
        return _BOOLEANS[word]
    if types & {"integer", "number"}:
        try:
            return int(word)  # "100" -> 100, as YAML reads it
        except ValueError:
            pass
        try:
            number = float(word)  # "1e-3", "0.1", "1e3"
        except ValueError:
            return text
        if not math.isfinite(number):
            return text
        if "number" in types:
            return number
        if number.is_integer():
            return int(number)
    return text


def _coerce(value: Any, schema: dict) -> Any:
    """``value`` with strings converted to the types ``schema`` asks for (dicts in place).

    A string that does not convert stays as it is, for validation to report.
    """
    types = _types(schema)
    if isinstance(value, str) and types & {"array", "object"}:
        try:
            parsed = yaml.load(value, Loader=_StrictLoader)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list) and "array" in types or isinstance(parsed, dict) and "object" in types:
            value = parsed
    if isinstance(value, str):
        return _parse_scalar(value, types)
    if isinstance(value, float) and "integer" in types and "number" not in types and value.is_integer():
        # 7.0 (YAML, a hand-edited file) is the integer 7: the same validated config, so the same
        # settings, fingerprints and results (jsonschema takes 7.0 as an integer and would pass it on
        # as a float; numpy's SeedSequence refuses one). 7.5 stays, for validation to refuse.
        return int(value)
    if isinstance(value, list) and "items" in schema:
        return [_coerce(item, schema["items"]) for item in value]
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                value[key] = _coerce(value[key], sub)
    return value


def _key_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


_TYPE_NAMES = {"number": "a number", "integer": "an integer", "boolean": "true or false", "null": "null",
               "string": "a string", "object": "a mapping", "array": "a list"}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(error) -> str:
    key = _key_path(error)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        where = "" if key == "(top level)" else f"{key}: "
        return f"{where}unknown key {extra[0]!r} (known keys: {', '.join(known)})"
    if error.validator == "required":
        return f"{key}: {error.message}"
    if error.validator == "type":
        wanted = " or ".join(_TYPE_NAMES.get(t, t) for t in sorted(_types(error.schema)))
        return f"{key}: {_short(error.instance)} is not {wanted}"
    # jsonschema's messages start with the value's repr: keep the rest ("is less than the minimum of 0")
    message = error.message.removeprefix(repr(error.instance)).strip()
    if message == error.message.strip():
        message = f"is invalid: {message}"
    return f"{key}: {_short(error.instance)} {message}"


def validate(config: dict, source: str = "config") -> dict:
    """Convert string values to the schema's types, fill defaults (both in place) and
    validate ``config``; return it.

    Raises :class:`PipelineError` naming the first offending key and value.
    """
    if not isinstance(config, dict):
        raise PipelineError(f"{source}: the config must be a YAML mapping, got {type(config).__name__}")
    import jsonschema

    schema = load_schema()
    _coerce(config, schema)
    runs = config.get("runs")
    for overrides in runs.values() if isinstance(runs, dict) else ():
        if isinstance(overrides, dict):  # a run's seed/training/model, typed as at the top level
            _coerce(overrides, schema)
    _fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        # Report the deepest error of the first failing key: it names the value.
        first = max((e for e in errors if e.absolute_path == errors[0].absolute_path), key=lambda e: len(e.path))
        raise PipelineError(f"{source}: {_describe(first)}")
    _check_sizes(config, source)
    _check_runs(config, source)
    return config


def _check_sizes(config: dict, source: str) -> None:
    for key in ("val_size", "test_size"):
        value = config["dataset"][key]
        if not (float(value).is_integer() or 0 < value < 1):
            raise PipelineError(
                f"{source}: dataset.{key}: {value!r} is neither a count nor a fraction in (0, 1)")


# A sweep (``runs:``) shares these folders: one set of embeddings, and a folder per run under one output_dir.
_SHARED_LOCATIONS = {
    "training.embeddings_dir": "the runs share one set of embeddings, in one embeddings_dir",
    "training.output_dir": "every run's folder is {training.output_dir}/ptm-mamba-{run}/, one output_dir for all runs",
}


def _leaves(overrides: dict, prefix: str = "") -> list[str]:
    """The dotted keys a run's overrides set (``training.lr``, ``model.ssm_cfg.d_state``)."""
    keys = []
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        keys += _leaves(value, f"{dotted}.") if isinstance(value, dict) and value else [dotted]
    return keys


def _lookup(config: dict, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _shared_key(key: str, settings) -> str | None:
    """Why a run may not override ``key``: a key of a stage whose result the runs share (the prepare,
    cluster and split stages; the embed stage when the run reads stored embeddings), by
    ``stages.DEPENDS_ON``, or a folder the runs share; None if it may."""
    from .stages import CLUSTER, DEPENDS_ON, EMBED, PREPARE, SPLIT

    if key in _SHARED_LOCATIONS:
        return _SHARED_LOCATIONS[key]
    for stage in (PREPARE, CLUSTER, SPLIT, *([EMBED] if settings.training.precomputed else [])):
        for dep in DEPENDS_ON[stage]:
            if (dep.when is None or dep.when(settings)) and (
                    key == dep.key or key.startswith(f"{dep.key}.") or dep.key.startswith(f"{key}.")):
                hint = (" (or give this run training.use_precomputed_embeddings: false, and it reads none)"
                        if stage == EMBED else "")
                return (f"it is a setting of the {stage} stage, whose result the runs share (one split and one "
                        f"set of embeddings for all runs): set it at the top level{hint}")
    return None


def run_names(config: dict) -> list[str]:
    """The names of a config's ``runs`` (a sweep), in their order; [] without runs."""
    return list(config.get("runs") or {})


def run_config(config: dict, run_name: str, source: str = "config") -> dict:
    """The config of run ``run_name`` of a validated ``config``'s ``runs``: the top level with the
    run's overrides merged in (sections key by key, as Snakemake merges config files), ``run_name``
    set to the run and no ``runs``; validated, with the schema's defaults filled.

    Raises :class:`PipelineError` (one line naming the run and the key) for an unknown run, a value
    the schema refuses, or an override of a key whose stage's result the runs share (:func:`_shared_key`).
    """
    from .settings import Settings

    runs = config.get("runs") or {}
    if run_name not in runs:
        known = f"its runs are {', '.join(runs)}" if runs else "it has no runs"
        raise PipelineError(f"{source}: no run {run_name!r} in the config ({known})")
    where = f"{source}: runs.{run_name}"
    base = copy.deepcopy({key: value for key, value in config.items() if key != "runs"})
    merged = _merge(copy.deepcopy(base), copy.deepcopy(runs[run_name]))
    merged["run_name"] = run_name
    validate(merged, source=where)
    settings = Settings.from_config(merged)
    for key in _leaves(runs[run_name]):
        why = _shared_key(key, settings)
        if why is not None and _lookup(merged, key) != _lookup(base, key):
            raise PipelineError(f"{where}: {key} cannot be set per run: {why}")
    return merged


def settings_of_run(config: dict[str, Any], run_name: str | None, source: str = "config") -> Settings:
    """The settings run ``run_name`` of a validated ``config`` trains with: with ``runs:``, the top level
    with that run's overrides (:func:`run_config`); without, the config's own (whatever
    the name: it names only the run's folder). The CLI's train and the workflow's train rule both take
    a run's settings from here."""
    from .settings import Settings

    runs = config.get("runs")
    if runs is None:
        return Settings.from_config(config)
    if run_name is None:
        raise PipelineError(f"{source}: the config defines runs ({', '.join(runs)}): name the one to train")
    return Settings.from_config(run_config(config, run_name, source=source))


def _merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in, mappings key by key (in place; returns ``base``)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _check_runs(config: dict, source: str) -> None:
    """Every run of a sweep makes a valid config that shares the split and embeddings (:func:`run_config`)."""
    if config.get("runs") is None:
        return
    if config.get("run_name") is not None:
        raise PipelineError(f"{source}: run_name: {config['run_name']!r} with runs: each run is named by its key "
                            "in runs (outputs/ptm-mamba-{run}/); set run_name: null")
    for name in config["runs"]:
        run_config(config, name, source=source)


def load_config(path: str | os.PathLike) -> dict:
    """Read (strictly), convert, default-fill and validate a config file."""
    path = Path(path)
    config = load_yaml_strict(path)
    if config is None:
        raise PipelineError(f"{path}: the config file is empty")
    if edited_invocation_config(path, path.read_text(encoding="utf-8")):
        raise PipelineError(f"{path}: edited after the workflow wrote it (its name is the hash of the settings its "
                            "jobs run with); change settings in your config file and run snakemake again")
    return validate(config, source=str(path))


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
