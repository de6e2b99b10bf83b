"""Docs that match the code: every config key is in the README, every default there is the schema's."""

from __future__ import annotations

import re

import yaml

from conftest import REPO
from ptm_mamba.config import load_config, load_schema


def leaf_keys(schema: dict, prefix: str = "") -> dict[str, object]:
    keys = {}
    for name, sub in schema["properties"].items():
        if sub.get("type") == "object" and "properties" in sub and name != "ssm_cfg":
            keys.update(leaf_keys(sub, f"{prefix}{name}."))
        else:
            keys[prefix + name] = sub.get("default", "(required)")
    return keys


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    table = {}
    for line in readme.splitlines():
        if line.startswith("| `") and line.count("|") >= 4:
            cells = [c.strip() for c in line.strip("|").split("|")]
            names = re.findall(r"`([a-z_.]+)`", cells[0])
            defaults = re.findall(r"`([^`]*)`", cells[1]) or [cells[1]]
            for i, name in enumerate(names):
                table[name] = defaults[min(i, len(defaults) - 1)]
    for key, default in leaf_keys(load_schema()).items():
        assert key in table, f"README's config reference lacks {key}"
        if default != "(required)":
            documented = yaml.safe_load(table[key])
            assert documented == default or float(documented) == float(default), (key, documented, default)


def test_shipped_configs_are_valid_and_paper_is_the_published_scale():
    load_config(REPO / "config" / "config.yaml")  # unknown keys or bad values would raise
    paper = load_config(REPO / "config" / "paper.yaml")
    assert paper["esm"]["model"] == "esm2_t33_650M_UR50D"
    assert (paper["model"]["model_type"], paper["model"]["d_model"], paper["model"]["n_layer"]) == \
        ("bidirectional_mamba", 768, 24)
    assert paper["training"]["lr"] == 2e-4 and paper["training"]["max_tokens_per_batch"] == 80000
    assert paper["training"]["adam_betas"] == [0.9, 0.98] and paper["training"]["weight_decay"] == 0.01
    assert paper["dataset"]["max_sequence_length"] == 1024
