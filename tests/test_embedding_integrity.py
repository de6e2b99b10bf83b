"""Damaged embedding stores, on real HDF5 files: flipped bytes (Fletcher32), truncation,
NaN written behind the checksums' back, and embeddings whose row counts disagree with the split."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ptm_mamba.data import BatchBuilder
from ptm_mamba.dataset import Protein
from ptm_mamba.embedding_store import EmbeddingReader, ShardWriter, gather, validate_shard
from ptm_mamba.errors import PipelineError
from ptm_mamba.tokenizer import PTMTokenizer
from test_embedding_store import ATTRS, DIM, K, assert_reads, make_proteins

CHUNK = 16  # rows per chunk: small, so a shard has several chunks and a damaged one spares the others
TOK = PTMTokenizer()
SEQS = {"P1": "MK<Phosphoserine>LLVGTAYIAK", "P2": "M<N-acetylalanine>KTAYIAKQRQISF", "P3": "ACDEFGHIKLMNPQ"}


def write(path: Path, proteins: dict, index: int, num: int) -> Path:
    with ShardWriter(path, dim=DIM, replicates=K, attrs={**ATTRS, "shard_index": index, "num_shards": num},
                     chunk_rows=CHUNK) as w:
        for pid, (feats, masks) in proteins.items():
            w.add(pid, feats, masks)
    return path


def gathered(folder: Path, shards: list[dict]) -> tuple[list[Path], Path]:
    """Shards ``folder/shards/train_<i>.h5`` holding ``shards[i]``, gathered into ``folder/train_embeddings.h5``."""
    (folder / "shards").mkdir(parents=True)
    paths = [write(folder / "shards" / f"train_{i}.h5", p, i, len(shards)) for i, p in enumerate(shards)]
    gather(paths, folder / "train_embeddings.h5", expected_attrs=ATTRS)
    return paths, folder / "train_embeddings.h5"


def split_proteins() -> list[Protein]:
    return [Protein(pid, seq, tuple(TOK.split(seq))) for pid, seq in SEQS.items()]


def stored_for(proteins: list[Protein], short: dict[str, int] | None = None) -> dict:
    """Stored features of the split's proteins as the embed stage lays them out: <cls>, one row per
    residue, <eos>, masks False at <cls>/<eos> (``short[id]`` residue rows fewer)."""
    rng = np.random.default_rng(0)
    out = {}
    for p in proteins:
        L = p.length - (short or {}).get(p.id, 0)
        out[p.id] = ([rng.standard_normal((L + 2, DIM)).astype(np.float32) for _ in range(K)],
                     [np.concatenate([[False], rng.random(L) < 0.15, [False]]) for _ in range(K)])
    return out


def builder(proteins: list[Protein], store_path: Path) -> BatchBuilder:
    return BatchBuilder(proteins, max_sequence_length=1024, mask_prob=0.15, random_mask_only_prob=0.5,
                        store=EmbeddingReader(store_path))


@contextmanager
def one_line_error(pattern: str):
    with pytest.raises(PipelineError, match=pattern) as e:
        yield
    assert "\n" not in str(e.value), str(e.value)


def flip_bytes(path: Path, dataset: str, chunk: tuple[int, ...], n: int = 4) -> None:
    """Change ``n`` bytes at the start of one stored chunk, as a bad disk would.

    XOR with 0x5A, not 0xFF: Fletcher32 sums 16-bit words mod 65535, so it cannot tell a
    0x0000 word (all-False mask bytes) from 0xFFFF."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info_by_coord(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        data = fh.read(n)
        fh.seek(info.byte_offset)
        fh.write(bytes(b ^ 0x5A for b in data))


def test_clean_store_has_checksums_and_passes_everything(tmp_path):
    proteins = split_proteins()
    stored = stored_for(proteins)
    paths, out = gathered(tmp_path, [dict(list(stored.items())[:2]), dict(list(stored.items())[2:])])
    for path in paths:
        with h5py.File(path, "r") as f:
            for k in range(K):
                assert f[f"embeddings/{k}"].fletcher32 and f[f"masks/{k}"].fletcher32
            assert f["offsets"].fletcher32
            assert not f["ids"].fletcher32  # variable-length strings cannot be filtered
        validate_shard(path, expected_ids=None, expected_attrs=ATTRS, check_values=True)
    with h5py.File(out, "r") as f:  # the gathered file has checksums of its own
        for name in ["offsets"] + [f"{g}/{k}" for g in ("embeddings", "masks") for k in range(K)]:
            assert f[name].fletcher32 and f[name].chunks, name
        assert f["embeddings/0"].chunks == (CHUNK, DIM)  # the shards' chunking
    validate_shard(out, expected_ids=list(SEQS), expected_attrs=ATTRS, check_values=True)
    with EmbeddingReader(out) as r:
        assert_reads(r, stored)
        assert r.row_counts(list(SEQS)).tolist() == [p.length + 2 for p in proteins]
    b = builder(proteins, out)
    batch = b.build([0, 1, 2], replicate=1, generator=torch.Generator().manual_seed(0))
    L = proteins[1].length
    np.testing.assert_array_equal(batch.esm_features[1, :L + 2].numpy(), stored["P2"][0][1].astype(np.float16))
    assert not batch.esm_features[1, L + 2:].any()  # zeros at padding only
    b.build([2, 0], replicate=0, generator=None)


def test_flipped_bytes_fail_the_checksum(tmp_path):
    shard0, shard1 = make_proteins(8, seed=11), make_proteins(4, seed=12)
    paths, out = gathered(tmp_path, [shard0, shard1])
    with h5py.File(paths[0], "r") as f:
        offsets = f["offsets"][()]
    ids = list(shard0)
    damaged = [pid for pid, a in zip(ids, offsets[:-1]) if a < CHUNK]  # rows overlapping chunk 0
    intact = [pid for pid, a in zip(ids, offsets[:-1]) if a >= CHUNK]
    assert damaged and intact
    flip_bytes(paths[0], "embeddings/0", (0, 0))

    shard = re.escape(str(paths[0]))
    with one_line_error(rf"^{shard}: embeddings/0 rows 0\.\.\d+: stored data unreadable \(checksum mismatch"):
        validate_shard(paths[0], expected_ids=None, expected_attrs=ATTRS, check_values=True)
    validate_shard(paths[0], expected_ids=None, expected_attrs=ATTRS, check_values=False)  # layout is intact
    with one_line_error(rf"^{shard}: embeddings/0 rows"):
        gather(paths, tmp_path / "again.h5")

    with EmbeddingReader(paths[0]) as r:
        with one_line_error(rf"^{shard}: protein '{damaged[0]}' replicate 0: stored data unreadable"):
            r.get(damaged[0], 0)
        with one_line_error(rf"^{shard}: protein '{damaged[-1]}' replicate 0: "):  # adjacent: one merged read
            r.get_many([intact[1], intact[0], damaged[-1]], 0)
        assert_reads(r, {pid: shard0[pid] for pid in intact})  # other chunks
        x, _ = r.get(damaged[0], 1)  # other replicate
        np.testing.assert_array_equal(x, shard0[damaged[0]][0][1].astype(np.float16))

    # the file gathered before the damage holds its own copy, intact
    with EmbeddingReader(out) as r:
        assert_reads(r, shard0 | shard1)
    validate_shard(out, expected_ids=None, expected_attrs=ATTRS)


def test_flipped_bytes_in_the_gathered_file_fail_its_checksum(tmp_path):
    shard0, shard1 = make_proteins(8, seed=11), make_proteins(4, seed=12)
    _, out = gathered(tmp_path, [shard0, shard1])
    with h5py.File(out, "r") as f:
        offsets = f["offsets"][()]
    ids = list(shard0) + list(shard1)
    damaged = [pid for pid, a in zip(ids, offsets[:-1]) if a < CHUNK]
    intact = [pid for pid, a in zip(ids, offsets[:-1]) if a >= CHUNK]
    assert damaged and intact
    flip_bytes(out, "embeddings/0", (0, 0))
    where = re.escape(str(out))
    with EmbeddingReader(out) as r:
        with one_line_error(rf"^{where}: protein '{damaged[0]}' replicate 0: stored data unreadable \(checksum "
                            "mismatch"):
            r.get(damaged[0], 0)
        assert_reads(r, {pid: (shard0 | shard1)[pid] for pid in intact})
    with one_line_error(rf"^{where}: embeddings/0 rows 0\.\.\d+: stored data unreadable"):
        validate_shard(out, expected_ids=None, expected_attrs=ATTRS)


def test_flipped_mask_bytes_are_found_by_validation(tmp_path):
    path = write(tmp_path / "s.h5", make_proteins(3, seed=13), 0, 1)
    flip_bytes(path, "masks/1", (0,))
    with one_line_error(rf"^{re.escape(str(path))}: masks/1 rows 0\.\.\d+: stored data unreadable"):
        validate_shard(path, expected_ids=None, expected_attrs=ATTRS)


def test_truncated_shard(tmp_path):
    shard0, shard1 = make_proteins(4, seed=14), make_proteins(4, seed=15)
    paths, out = gathered(tmp_path, [shard0, shard1])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 100])
    shard = re.escape(str(paths[1]))
    with one_line_error(rf"^{shard}: not a readable HDF5 file \(truncated or corrupt\)"):
        validate_shard(paths[1], expected_ids=None, expected_attrs=ATTRS)
    with one_line_error(rf"^{shard}: not a readable HDF5 file \(truncated or corrupt\)"):
        EmbeddingReader(paths[1]).get(next(iter(shard1)), 0)
    with one_line_error(rf"^{shard}: not a readable HDF5 file \(truncated or corrupt\)"):
        gather(paths, tmp_path / "again.h5")
    assert not (tmp_path / "again.h5").exists()
    with EmbeddingReader(out) as r:  # gathered before: a copy of its own
        assert_reads(r, shard0 | shard1)


def test_truncated_gathered_file(tmp_path):
    shard0, shard1 = make_proteins(4, seed=14), make_proteins(4, seed=15)
    _, out = gathered(tmp_path, [shard0, shard1])
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 100])
    with one_line_error(rf"^{re.escape(str(out))}: not a readable HDF5 file \(truncated or corrupt\)"):
        EmbeddingReader(out).get(next(iter(shard1)), 0)


def test_nan_behind_valid_checksums_is_refused_when_building_batches(tmp_path):
    proteins = split_proteins()
    _, out = gathered(tmp_path, [stored_for(proteins)])
    with h5py.File(out, "r+") as f:  # h5py recomputes the chunk's checksum: only the values are bad
        row = int(f["offsets"][1]) + 4  # a residue of P2
        f["embeddings/1"][row, 3] = np.nan
    b = builder(proteins, out)
    for gen in (torch.Generator().manual_seed(0), None):
        with one_line_error(rf"^{re.escape(str(out))}: protein 'P2' replicate 1 has NaN/Inf embeddings"):
            b.build([0, 1, 2], replicate=1, generator=gen)
    b.build([0, 1, 2], replicate=0, generator=None)  # the other replicate is clean
    b.build([2, 0], replicate=1, generator=None)  # and so are the other proteins


def test_row_count_must_match_the_split(tmp_path):
    proteins = split_proteins()
    _, out = gathered(tmp_path, [stored_for(proteins, short={"P2": 3})])
    L = proteins[1].length
    with one_line_error(rf"^{re.escape(str(out))}: protein 'P2' has {L - 1} rows of embeddings, expected {L + 2} "
                        rf"\(<cls>, {L} residues, <eos>\) \(stale or foreign embeddings; rerun the embed stage\)$"):
        builder(proteins, out)


def test_store_written_without_checksums_still_reads(tmp_path):
    """A store without the Fletcher32 filter (written by hand here) reads as before, unchecked."""
    proteins = split_proteins()
    stored = stored_for(proteins)
    new = write(tmp_path / "new.h5", stored, 0, 1)
    old = tmp_path / "old.h5"
    with h5py.File(new, "r") as src, h5py.File(old, "w") as dst:
        for name in ["ids", "offsets"] + [f"{g}/{k}" for g in ("embeddings", "masks") for k in range(K)]:
            dst.create_dataset(name, data=src[name][()], dtype=src[name].dtype)
        dst.attrs.update(src.attrs)
    with h5py.File(old, "r") as f:
        assert not f["embeddings/0"].fletcher32
    validate_shard(old, expected_ids=list(SEQS), expected_attrs=ATTRS, check_values=True)
    with EmbeddingReader(old) as r:
        assert_reads(r, stored)
    builder(proteins, old).build([0, 1, 2], replicate=1, generator=None)
