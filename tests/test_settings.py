"""The typed settings mirror the schema: one field per key of each section, and the plain config back
byte for byte (config.yaml of a run is written from them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ptm_mamba.config import dump_config, load_config, load_schema
from ptm_mamba import settings as settings_module
from ptm_mamba.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"key_order"}


def test_every_section_has_a_field_per_schema_key():
    schema = load_schema()["properties"]
    assert _fields(Settings) == set(schema)
    sections = {f.name: f.type for f in dataclasses.fields(Settings) if f.type.endswith("Settings")}
    assert set(sections) == {"dataset", "esm", "embedding", "training", "model", "predict", "evaluate"}
    for section, cls in sections.items():
        assert _fields(getattr(settings_module, cls)) == set(schema[section]["properties"]), section
    source = schema["dataset"]["properties"]["source"]["properties"]
    assert _fields(settings_module.SourceSettings) == set(source)


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_the_shipped_configs_come_back_byte_for_byte(name):
    config = load_config(REPO / "config" / name)
    settings = Settings.from_config(config)
    assert dump_config(settings.as_dict()) == dump_config(config)
    assert settings.dataset.max_residues == config["dataset"]["max_sequence_length"] - 2
    assert settings.training.precomputed == (config["training"]["use_esm"]
                                             and config["training"]["use_precomputed_embeddings"])
