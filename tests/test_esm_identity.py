"""A pretrained ESM-2 name (``esm.model: esm2_t6_8M_UR50D``) is identified by the bytes of its weights in the
torch hub cache: the name while they are the bytes first seen there (not yet downloaded, then downloaded:
one identity, no rerun), ``<name>@sha256:...`` once they are other bytes (reruns, stale checks)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import REPO, settings_for, tiny_config, toy_rows, write_config, write_csv
from ptm_mamba import provenance
from ptm_mamba.config import validate
from ptm_mamba.errors import PipelineError
from ptm_mamba.esm import load_esm
from ptm_mamba.esm_weights import esm_identity, hub_checkpoint_dir
from ptm_mamba.layout import split_store_path
from ptm_mamba.stages import EMBED, TRAIN, check_settings, stage_fingerprint, stage_settings
from ptm_mamba.testing import write_tiny_esm2_checkpoint

NAME = "esm2_t6_8M_UR50D"
TINY = {"num_layers": 2, "embed_dim": 16, "attention_heads": 2}


def sha256(path: Path) -> str:
    return f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache (TORCH_HOME) and user cache (XDG_CACHE_HOME), no network;
    returns where fair-esm caches NAME's weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.get_dir() follows TORCH_HOME

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    weights = hub_checkpoint_dir() / f"{NAME}.pt"
    assert weights == tmp_path / "torch" / "hub" / "checkpoints" / f"{NAME}.pt"
    return weights


@pytest.fixture
def config(tmp_path) -> dict:
    data = write_csv(tmp_path / "data.csv", toy_rows(7))
    return validate({"dataset": {"dataset_location": str(data)}, "esm": {"model": NAME},
                     "training": {"use_esm": True, "use_precomputed_embeddings": True}})


def fingerprints(config: dict) -> dict[str, str]:
    settings = settings_for(config)
    return {stage: stage_fingerprint(settings, stage) for stage in (EMBED, TRAIN)}


def first_seen(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "cache" / "ptm-mamba" / "esm-first-seen.json").read_text())


def test_a_name_keeps_its_identity_when_its_weights_arrive(hub, config, tmp_path):
    before = fingerprints(config)  # not downloaded yet: the name
    assert esm_identity(NAME) == NAME and fingerprints(config) == before
    assert not (tmp_path / "cache" / "ptm-mamba" / "esm-first-seen.json").exists()  # nothing seen, nothing recorded

    write_tiny_esm2_checkpoint(hub, **TINY)  # "downloaded": fair-esm's two files, in its layout
    assert fingerprints(config) == before and esm_identity(NAME) == NAME
    (key, entry), = first_seen(tmp_path).items()  # recorded when first seen, per name and file
    assert key == f"{NAME} {hub.resolve()}" and entry["sha256"] == sha256(hub)
    assert fingerprints(config) == before  # and stays so
    m = load_esm(NAME)  # the loader takes it under the name, from the cache (the network is off)
    assert (m.name, m.num_layers, m.embed_dim) == (NAME, 2, 16)


def test_other_bytes_under_the_name_are_another_identity(hub, config, tmp_path):
    write_tiny_esm2_checkpoint(hub, **TINY)
    original = hub.read_bytes()
    before, recorded = fingerprints(config), stage_settings(settings_for(config), EMBED)
    assert recorded["esm.model"] == NAME
    trained = stage_settings(settings_for(config), TRAIN)

    write_tiny_esm2_checkpoint(hub, **TINY, seed=1)  # other weights in the cached file
    assert esm_identity(NAME) == f"{NAME}@{sha256(hub)}"
    after = fingerprints(config)
    assert after[EMBED] != before[EMBED] and after[TRAIN] != before[TRAIN]
    for stage, old in ((EMBED, recorded), (TRAIN, trained)):
        with pytest.raises(PipelineError) as err:
            check_settings(old, settings_for(config), stage, "x.h5", "rerun")
        assert f"made with esm.model = '{NAME}', but the config gives '{NAME}@sha256:" in str(err.value)
    record = first_seen(tmp_path)
    assert [entry["sha256"] for entry in record.values()] == [f"sha256:{hashlib.sha256(original).hexdigest()}"]
    assert fingerprints(config) == after  # stable

    # a corrupt download replaced, the file deleted and fetched again: what is recorded stays the first
    # bytes; the bytes first seen are the name again, a missing file is the name (nothing to hash)
    hub.write_bytes(original)
    assert fingerprints(config) == before
    hub.unlink()
    assert esm_identity(NAME) == NAME
    assert first_seen(tmp_path) == record


def test_the_record_is_per_cached_file(hub, config, tmp_path, monkeypatch):
    """Projects sharing a hub cache share its record; another hub cache has its own first bytes."""
    write_tiny_esm2_checkpoint(hub, **TINY)
    assert esm_identity(NAME) == NAME
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "other-torch"))
    other = write_tiny_esm2_checkpoint(hub_checkpoint_dir() / f"{NAME}.pt", **TINY, seed=2)
    assert esm_identity(NAME) == NAME
    assert {k: v["sha256"] for k, v in first_seen(tmp_path).items()} == {
        f"{NAME} {hub.resolve()}": sha256(hub), f"{NAME} {other.resolve()}": sha256(other)}


def test_without_a_writable_user_cache_a_name_is_its_name(hub, config, tmp_path, monkeypatch):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    write_tiny_esm2_checkpoint(hub, **TINY)
    assert esm_identity(NAME) == NAME
    write_tiny_esm2_checkpoint(hub, **TINY, seed=1)
    assert esm_identity(NAME) == NAME  # nothing recorded to compare with: as before this record existed


def test_corrupt_record_starts_over(hub, config, tmp_path):
    record = tmp_path / "cache" / "ptm-mamba" / "esm-first-seen.json"
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    write_tiny_esm2_checkpoint(hub, **TINY)
    assert esm_identity(NAME) == NAME and first_seen(tmp_path)[f"{NAME} {hub.resolve()}"]["sha256"] == sha256(hub)


def test_paths_hub_ids_and_folders_are_unchanged(hub, tmp_path):
    path = write_tiny_esm2_checkpoint(tmp_path / "esm2_t2_tiny.pt", **TINY)
    assert esm_identity(str(path)) == sha256(path)
    assert esm_identity("facebook/esm2_t6_8M_UR50D") == "facebook/esm2_t6_8M_UR50D"
    assert esm_identity("esm2_t99_unknown") == "esm2_t99_unknown"  # not a fair-esm name, not a file
    assert not (tmp_path / "cache" / "ptm-mamba" / "esm-first-seen.json").exists()


def test_provenance_records_the_sha256_of_the_weights(hub, config, tmp_path):
    assert provenance.provenance(settings_for(config))["esm"] == {"model": NAME, "identity": NAME, "sha256": None}
    write_tiny_esm2_checkpoint(hub, **TINY)
    assert provenance.provenance(settings_for(config))["esm"] == {"model": NAME, "identity": NAME, "sha256": sha256(hub)}
    write_tiny_esm2_checkpoint(hub, **TINY, seed=1)
    assert provenance.provenance(settings_for(config))["esm"] == {"model": NAME, "identity": f"{NAME}@{sha256(hub)}",
                                                    "sha256": sha256(hub)}
    path = write_tiny_esm2_checkpoint(tmp_path / "esm2_t2_tiny.pt", **TINY)
    local = validate({**config, "esm": {"model": str(path)}})
    assert provenance.provenance(settings_for(local))["esm"] == {"model": str(path), "identity": sha256(path),
                                                   "sha256": sha256(path)}


# ----------------------------------------------------------------------------- Snakemake

# Every Python process of the workflow (Snakemake, the jobs) gets urlopen serving fair-esm's URLs from a
# folder: the embed jobs "download" the weights the way they would from fair-esm's server.
SITECUSTOMIZE = """
import io, os, urllib.error, urllib.request
def urlopen(url, timeout=None):
    path = os.path.join(os.environ["FAKE_ESM_SERVER"], str(url).rsplit("/", 1)[-1])
    if not os.path.isfile(path):
        raise urllib.error.URLError("no such file")
    return io.BytesIO(open(path, "rb").read())
urllib.request.urlopen = urlopen
"""


@pytest.mark.slow
def test_snakemake_downloads_once_and_reruns_embed_for_other_bytes(tmp_path, monkeypatch):
    root = tmp_path / "project"
    server = write_tiny_esm2_checkpoint(tmp_path / "server" / f"{NAME}.pt", **TINY)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "FAKE_ESM_SERVER": str(server.parent),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    config = tiny_config(root, n=24, esm={"model": NAME}, embedding={"shards": 1, "mask_replicates": 1})
    write_config(root / "config.yaml", **config)

    def snakemake(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                                 "--cores", "2", "embeddings", *args, "--directory", str(root),
                                 "--configfile", str(root / "config.yaml")],
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    cached = tmp_path / "torch" / "hub" / "checkpoints" / f"{NAME}.pt"
    assert not cached.exists()
    snakemake()  # parsed without the weights (identity: the name); the first embed job downloads them
    assert cached.read_bytes() == server.read_bytes()
    assert "Nothing to be done" in snakemake("-n")  # with the weights there, still the name: no rerun

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    from ptm_mamba.embedding_store import check_store_settings

    for split in ("train", "val", "test"):  # the stores record the name
        check_store_settings(split_store_path(root / "embeddings", split), settings_for(config))

    write_tiny_esm2_checkpoint(cached, **TINY, seed=1)  # other weights under the name
    planned = snakemake("-n")
    assert "embed_shard" in planned and "gather_embeddings" in planned, planned[-2000:]
    with pytest.raises(PipelineError, match=f"made with esm.model = '{NAME}', but the config gives '{NAME}@sha256:"):
        check_store_settings(split_store_path(root / "embeddings", "train"), settings_for(config))
