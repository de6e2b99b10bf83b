"""Every config key is either a dependency of some stage (``stages.DEPENDS_ON``, its rerun trigger and
stale check) or listed as changing no result (``stages.NO_RESULT_KEYS``): a new key in the schema
cannot silently miss its rerun trigger."""

from __future__ import annotations

import copy

import pytest

from ptm_mamba.config import load_schema
from ptm_mamba.stages import DEPENDS_ON, NO_RESULT_KEYS


def schema_keys(node: dict, prefix: str = "") -> list[str]:
    """Every key of the schema, sections (``model.ssm_cfg``) and leaves, dotted."""
    keys = []
    for name, child in (node.get("properties") or {}).items():
        key = f"{prefix}{name}"
        keys.append(key)
        for branch in [child, *child.get("anyOf", []), *child.get("oneOf", [])]:
            keys += schema_keys(branch, f"{key}.")
    return sorted(set(keys))


def named(key: str, names: set[str]) -> bool:
    """Whether ``key`` is named in ``names``: itself, a section above it, or a key below it."""
    return any(key == n or key.startswith(f"{n}.") or n.startswith(f"{key}.") for n in names)


def unaccounted(schema: dict) -> list[str]:
    listed = {dep.key for deps in DEPENDS_ON.values() for dep in deps} | set(NO_RESULT_KEYS)
    return [key for key in schema_keys(schema) if not named(key, listed)]


def test_every_schema_key_is_a_dependency_or_changes_no_result():
    assert unaccounted(load_schema()) == []


def test_the_lists_name_only_keys_of_the_schema():
    keys = set(schema_keys(load_schema()))
    listed = {dep.key for deps in DEPENDS_ON.values() for dep in deps} | set(NO_RESULT_KEYS)
    assert sorted(listed - keys) == []
    assert not {dep.key for deps in DEPENDS_ON.values() for dep in deps} & set(NO_RESULT_KEYS)


@pytest.mark.parametrize("section", ["training", "dataset", "embedding", "esm"])
def test_a_new_unlisted_key_is_caught(section):
    schema = copy.deepcopy(load_schema())
    schema["properties"][section]["properties"]["a_new_knob"] = {"type": "integer", "default": 1}
    assert unaccounted(schema) == [f"{section}.a_new_knob"]


def test_a_new_top_level_key_or_subsection_is_caught():
    schema = copy.deepcopy(load_schema())
    schema["properties"]["another_section"] = {"type": "object", "properties": {"knob": {"type": "integer"}}}
    assert unaccounted(schema) == ["another_section", "another_section.knob"]
