"""Embeddings whose ids no longer name their own rows (issue 22, item 6): ids put in another order,
two ids swapped, two proteins' rows swapped, ids of another split or shard. Real stores made by
the embed stage, edited with h5py as a mistake or a tool would; training and gather must refuse
each in one line naming the file and the first position (and id) that is wrong.

The split's ``split_fingerprint``, recorded in every store, is a hash of the split *file*: it does
not change when the store's ids or rows are edited, and the row counts BatchBuilder checks cannot
tell two proteins of the same length apart; the first test shows both. ``check_store_ids`` binds
each id to its rows: their count (residues + 2) and the stored random masks, which the embed stage
draws from the id. The ``project`` fixture's proteins all have 30 residues, so only the masks can
show a swap there; the conftest project's proteins have different lengths (the row counts show it).
"""

from __future__ import annotations

import copy
import random
import re
import shutil
from pathlib import Path

import h5py
import pytest

from conftest import error_line, run_cli, settings_for, tiny_config, write_config, write_csv
from ptm_mamba.data import BatchBuilder
from ptm_mamba.embed import embed_all, split_proteins_of
from ptm_mamba.embedding_store import EmbeddingReader, check_store_ids
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import BEST_CKPT, run_dir, shard_path, split_csv, split_store_path
from ptm_mamba.split import run_split, split_fingerprint

SHARDS = 2
def same_length_rows(n: int = 32, residues: int = 30) -> list[tuple[str, str]]:
    rng = random.Random(3)
    body = lambda k: "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(k))  # noqa: E731
    return [(f"Q{i:03d}", "M<N-acetylalanine>" + body(residues - 3) + "<Phosphoserine>") for i in range(n)]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """Proteins of one length, split and embedded (2 shards per split): (root, config)."""
    root = tmp_path_factory.mktemp("same_length")
    data = write_csv(root / "same.csv", same_length_rows())
    config = tiny_config(root, dataset={"dataset_location": str(data), "val_size": 4, "test_size": 4},
                         embedding={"shards": SHARDS, "mask_replicates": 2, "max_tokens_per_batch": 4000})
    run_split(settings_for(config), root / "split")
    embed_all(settings_for(config), root / "split", root / "embeddings")
    write_config(root / "config.yaml", **config)
    return root, config


def copy_project(project, tmp_path):
    """A copy of a project's embeddings to damage: (embeddings dir, train proteins, config, its file)."""
    root, config = project
    emb = tmp_path / "embeddings"
    shutil.copytree(root / "embeddings", emb)  # the gathered files and the shards (embed_all keeps them)
    cfg = copy.deepcopy(config)
    cfg["run_name"] = "ids"
    cfg["training"].update(embeddings_dir=str(emb), output_dir=str(tmp_path / "outputs"))
    proteins = split_proteins_of(settings_for(config), "train", split_csv(root / "split", "train"))
    return emb, proteins, cfg, write_config(tmp_path / "c.yaml", **cfg)


@pytest.fixture
def copy_of(project, tmp_path):
    return copy_project(project, tmp_path)


def ids_of(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return [str(x) for x in f["ids"].asstr()[()]]


def set_ids(path: Path, ids: list[str]) -> None:
    with h5py.File(path, "r+") as f:
        for i, new in enumerate(ids):
            if f["ids"].asstr()[i] != new:
                f["ids"][i] = new


def swap_ids(path: Path, i: int, j: int) -> list[str]:
    ids = ids_of(path)
    ids[i], ids[j] = ids[j], ids[i]
    set_ids(path, ids)
    return ids


def swap_rows(path: Path, i: int, j: int) -> None:
    """Swap the rows (every replicate's features and masks) of proteins i and j of a store."""
    with h5py.File(path, "r+") as f:
        off = f["offsets"][()]
        a, b = slice(int(off[i]), int(off[i + 1])), slice(int(off[j]), int(off[j + 1]))
        assert a.stop - a.start == b.stop - b.start
        for k in range(f.attrs["mask_replicates"]):
            for group in ("embeddings", "masks"):
                d = f[f"{group}/{k}"]
                x, y = d[a], d[b]
                d[a], d[b] = y, x


def gathered(emb: Path) -> Path:
    return split_store_path(emb, "train")


def shard(emb: Path, index: int) -> Path:
    return shard_path(emb, "train", index, SHARDS)


def train_cli(config_file: Path, root: Path):
    return run_cli("train", "--config", config_file, "--split_dir", root / "split", "--no_progress")


def gather_cli(emb: Path, root: Path, out: Path):
    return run_cli("gather", "--config", root / "config.yaml", "--split", "train",
                   "--split_file", split_csv(root / "split", "train"),
                   "--shards", *[shard(emb, i) for i in range(SHARDS)], "--output", out)


# ----------------------------------------------------------------------------- what was not seen before

def test_the_split_fingerprint_and_row_counts_do_not_see_swapped_ids(copy_of):
    """Before this check: two ids swapped in a gathered file passed the fingerprint and BatchBuilder,
    and each protein would have trained on the other's ESM-2 features."""
    emb, proteins, _, _ = copy_of
    path = gathered(emb)
    ids = swap_ids(path, 0, 1)
    with EmbeddingReader(path) as store:
        assert store.attrs["split_fingerprint"] == split_fingerprint(proteins)  # the split file's hash
        BatchBuilder(proteins, max_sequence_length=64, mask_prob=0.15, random_mask_only_prob=0.2, store=store)
        with pytest.raises(PipelineError) as err:
            check_store_ids(store, proteins)
    assert str(err.value) == (f"{path}: position 0 ({ids[0]!r}) replicate 0: the stored mask is not the one the "
                              f"embed stage draws for {ids[0]!r}: the rows of another protein (ids reordered or "
                              "swapped?); rerun the embed stage")


@pytest.mark.parametrize("which", ["same length", "conftest"])
def test_untouched_stores_pass(project, embedded_project, which):
    root, config = project if which == "same length" else embedded_project
    shards = config["embedding"]["shards"]
    for split in ("train", "val", "test"):
        proteins = split_proteins_of(settings_for(config), split, root / "split" / f"{split}.csv")
        check_store_ids(split_store_path(root / "embeddings", split), proteins)
        for i in range(shards):
            check_store_ids(shard_path(root / "embeddings", split, i, shards), proteins)


def test_a_store_of_another_split_is_refused(project):
    root, config = project
    val = split_proteins_of(settings_for(config), "val", split_csv(root / "split", "val"))
    with pytest.raises(PipelineError, match=r"train_embeddings\.h5: made for another train split than the one "
                                            r"given \(split_fingerprint '\w+', the split's '\w+'\)"):
        check_store_ids(split_store_path(root / "embeddings", "train"), val)


# ----------------------------------------------------------------------------- the gathered file, for training

def damage_gathered(emb: Path, how: str) -> tuple[Path, str]:
    """Edit the gathered train file; returns it and a regex of the refusal."""
    path = gathered(emb)
    ids = ids_of(path)
    mask = r"position {} \('{}'\) replicate 0: the stored mask is not the one the embed stage draws for '{}'"
    if how == "two ids swapped":
        swap_ids(path, 2, 5)
        return path, mask.format(2, ids[5], ids[5])
    if how == "ids reordered":
        set_ids(path, ids[::-1])
        return path, mask.format(0, ids[-1], ids[-1])
    if how == "an id of another split":
        set_ids(path, ids[:3] + ["NOT_IN_THE_SPLIT"] + ids[4:])
        return path, r"position 3 holds 'NOT_IN_THE_SPLIT', not a protein of the train split"
    if how == "two proteins' rows swapped":  # ids untouched
        first = len(ids_of(shard(emb, 0)))  # shard 1's first protein, in the gathered file
        swap_rows(path, first, first + 3)
        return path, mask.format(first, ids[first], ids[first])
    raise AssertionError(how)


HOW = ["two ids swapped", "ids reordered", "an id of another split", "two proteins' rows swapped"]


@pytest.mark.parametrize("how", HOW)
def test_check_store_ids_refuses_a_damaged_gathered_file(copy_of, how):
    emb, proteins, _, _ = copy_of
    path, detail = damage_gathered(emb, how)
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}: {detail}") as err:
        check_store_ids(path, proteins)
    assert "\n" not in str(err.value) and str(err.value).endswith("rerun the embed stage")


@pytest.mark.parametrize("how", HOW)
def test_training_refuses_a_damaged_gathered_file(project, copy_of, how):
    root, _ = project
    emb, _, cfg, config_file = copy_of
    path, detail = damage_gathered(emb, how)
    line = error_line(train_cli(config_file, root), f"error: {path}: ")
    assert re.search(detail, line), line
    assert not (run_dir(cfg["training"]["output_dir"], "ids") / BEST_CKPT).exists()


def test_training_refuses_swapped_ids_of_proteins_of_other_lengths(embedded_project, tmp_path):
    """The conftest project (proteins of different lengths): the row counts show the swap."""
    root, _ = embedded_project
    emb, _, _, config_file = copy_project(embedded_project, tmp_path)
    ids = swap_ids(gathered(emb), 0, 1)
    line = error_line(train_cli(config_file, root), f"error: {gathered(emb)}: position 0 ({ids[0]!r}) has ")
    assert re.search(rf"rows of embeddings, but '{ids[0]}' has \d+ residues \(\+ <cls>, <eos>\): the rows of "
                     r"another protein \(ids reordered or swapped\?\)", line), line


# ----------------------------------------------------------------------------- shards, when gathered

def damage_shard(emb: Path, proteins, how: str) -> tuple[Path, str]:
    """Edit a train shard; returns it and a regex of the refusal's detail."""
    mask = r"position {} \('{}'\) replicate 0: the stored mask is not the one the embed stage draws for '{}'"
    a, b = ids_of(shard(emb, 0)), ids_of(shard(emb, 1))
    if how == "two ids swapped":
        swap_ids(shard(emb, 0), 1, 4)
        return shard(emb, 0), mask.format(1, a[4], a[4])
    if how == "ids reordered":
        set_ids(shard(emb, 1), b[::-1])
        return shard(emb, 1), mask.format(0, b[-1], b[-1])
    if how == "ids swapped across shards":
        a[2], b[2] = b[2], a[2]
        set_ids(shard(emb, 0), a)
        set_ids(shard(emb, 1), b)
        return shard(emb, 0), rf"position 2 holds '{a[2]}', not a protein of shard 0 of 2 of the train split"
    if how == "two proteins' rows swapped":
        swap_rows(shard(emb, 0), 1, 2)
        return shard(emb, 0), mask.format(1, a[1], a[1])
    raise AssertionError(how)


SHARD_HOW = ["two ids swapped", "ids reordered", "ids swapped across shards", "two proteins' rows swapped"]


@pytest.mark.parametrize("how", SHARD_HOW)
def test_gather_refuses_a_damaged_shard(project, copy_of, tmp_path, how):
    root, _ = project
    emb, proteins, _, _ = copy_of
    path, detail = damage_shard(emb, proteins, how)
    out = split_store_path(tmp_path, "train")
    line = error_line(gather_cli(emb, root, out), f"error: {path}: ")
    assert re.search(detail, line), line
    assert not out.exists()


def test_embed_recomputes_a_shard_whose_ids_were_swapped(project, copy_of):
    """The embed command keeps a finished shard; one whose ids were swapped is not one: it is
    computed again (rather than kept and refused by gather on every run)."""
    root, config = project
    emb, proteins, _, _ = copy_of
    swap_ids(shard(emb, 0), 0, 1)
    embed_all(settings_for(config), root / "split", emb)
    check_store_ids(shard(emb, 0), proteins)
    check_store_ids(gathered(emb), proteins)


def test_masks_are_checked_block_by_block(copy_of, monkeypatch):
    """Reads of the masks in blocks find the same (a tiny block: one protein at a time)."""
    from ptm_mamba import embedding_store

    emb, proteins, _, _ = copy_of
    monkeypatch.setattr(embedding_store, "_MASK_BLOCK_ROWS", 1)
    check_store_ids(gathered(emb), proteins)
    first = len(ids_of(shard(emb, 0))) + 2
    swap_rows(gathered(emb), first, first + 1)
    with pytest.raises(PipelineError, match=rf"position {first} \('[^']+'\) replicate 0: the stored mask"):
        check_store_ids(gathered(emb), proteins)
