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
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError
from .layout import edited_invocation_config

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
    _fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        # Report the deepest error of the first failing key: it names the value.
        first = max((e for e in errors if e.absolute_path == errors[0].absolute_path), key=lambda e: len(e.path))
        raise PipelineError(f"{source}: {_describe(first)}")
    _check_sizes(config, source)
    return config


def _check_sizes(config: dict, source: str) -> None:
    for key in ("val_size", "test_size"):
        value = config["dataset"][key]
        if not (float(value).is_integer() or 0 < value < 1):
            raise PipelineError(
                f"{source}: dataset.{key}: {value!r} is neither a count nor a fraction in (0, 1)")


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
