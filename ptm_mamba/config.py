"""The pipeline's one config: load YAML, fill defaults and validate against the schema.

The schema lives in ``workflow/schemas/config.schema.yaml``; the Snakefile
validates with the same file (``snakemake.utils.validate``), so a config that
passes one passes the other. Errors name the file, the key and the value.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError
from .fileio import atomic_write_text

_PACKAGE_SCHEMA = Path(__file__).parent / "schemas" / "config.schema.yaml"
_REPO_SCHEMA = Path(__file__).parent.parent / "workflow" / "schemas" / "config.schema.yaml"


def schema_path() -> Path:
    """The schema file: the repository's copy, or the one packaged with a wheel."""
    return _REPO_SCHEMA if _REPO_SCHEMA.exists() else _PACKAGE_SCHEMA


def load_schema() -> dict:
    with open(schema_path(), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _fill_defaults(instance: Any, schema: dict) -> None:
    """Set schema defaults for missing keys, recursively (as snakemake's validate does)."""
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub)


def _key_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _describe(error) -> str:
    key = _key_path(error)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        where = "" if key == "(top level)" else f"{key}: "
        return f"{where}unknown key {extra[0]!r} (known keys: {', '.join(known)})"
    if error.validator == "required":
        return f"{key}: {error.message}"
    return f"{key}: {error.instance!r} is invalid: {error.message}"


def validate(config: dict, source: str = "config") -> dict:
    """Fill defaults into ``config`` (in place) and validate it; return it.

    Raises :class:`PipelineError` naming the first offending key and value.
    """
    if not isinstance(config, dict):
        raise PipelineError(f"{source}: the config must be a YAML mapping, got {type(config).__name__}")
    import jsonschema

    schema = load_schema()
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
    """Read, default-fill and validate a config file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh)
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if config is None:
        raise PipelineError(f"{path}: the config file is empty")
    return validate(config, source=str(path))


def fingerprint(config: dict, *sections: str) -> str:
    """A short stable hash of some config sections (``"dataset"``, ``"training.mask_prob"``...).

    Snakemake rules carry it as a param, so changing a setting reruns exactly
    the stages that read it.
    """
    picked = {}
    for name in sections:
        value: Any = config
        for part in name.split("."):
            value = value[part]
        picked[name] = value
    text = json.dumps(picked, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def write_config(config: dict, path: str | os.PathLike) -> None:
    """Write a resolved config atomically, leaving the file untouched when unchanged."""
    text = dump_config(config)
    path = Path(path)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)
