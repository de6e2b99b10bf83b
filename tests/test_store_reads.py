"""The training's reads of stored embeddings (issue 18), on real HDF5 files: int8 stores with a
scale per row, per-protein checksums checked on every direct read, only the bytes asked for read,
and batch buffers reused without ever writing over a batch still in use."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ptm_mamba.data import BatchBuilder
from ptm_mamba.dataset import Protein
from ptm_mamba.embedding_store import EmbeddingReader, ShardWriter, dequantize, gather, quantize
from ptm_mamba.errors import PipelineError
from ptm_mamba.forward import esm_features
from ptm_mamba.tokenizer import PTMTokenizer
from test_embedding_store import ATTRS, K

TOK = PTMTokenizer()
DIM, CHUNK = 24, 16
SEQS = {f"P{i}": "MK<Phosphoserine>" + "LLVGTAYIAKQRQISFWE"[: 3 * i] for i in range(6)}


def proteins() -> list[Protein]:
    return [Protein(pid, seq, tuple(TOK.split(seq))) for pid, seq in SEQS.items()]


def features_of(ps: list[Protein], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {p.id: ([rng.standard_normal((p.length + 2, DIM)).astype(np.float32) * (1 + k) for k in range(K)],
                   [np.concatenate([[False], rng.random(p.length) < 0.3, [False]]) for _ in range(K)])
            for p in ps}


def gathered(folder: Path, stored: dict, dtype: str) -> Path:
    """Two shards of ``stored`` (chunks of CHUNK rows) gathered into ``folder/train_embeddings.h5``."""
    ids = list(stored)
    parts = [ids[: len(ids) // 2], ids[len(ids) // 2:]]
    paths = []
    for i, part in enumerate(parts):
        paths.append(folder / f"shard{i}.h5")
        with ShardWriter(paths[-1], dim=DIM, replicates=K, attrs={**ATTRS, "shard_index": i, "num_shards": 2},
                         chunk_rows=CHUNK, dtype=dtype) as w:
            for pid in part:
                w.add(pid, *stored[pid])
    gather(paths, folder / "train_embeddings.h5", expected_attrs=ATTRS)
    return folder / "train_embeddings.h5"


def builder(store: Path) -> BatchBuilder:
    return BatchBuilder(proteins(), max_sequence_length=1024, mask_prob=0.15, random_mask_only_prob=0.5,
                        store=EmbeddingReader(store))


def flip_byte(path: Path, dataset: str, row: int) -> None:
    """XOR one byte of ``dataset``'s row ``row`` in the file, as a bad disk would (below HDF5)."""
    with h5py.File(path, "r") as f:
        d = f[dataset]
        rows, row_bytes = d.chunks[0], d.dtype.itemsize * int(np.prod(d.shape[1:]))
        info = d.id.get_chunk_info_by_coord((row // rows * rows,) + (0,) * (d.ndim - 1))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + (row % rows) * row_bytes + 1)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x10]))


def test_quantize_error_is_half_a_step_per_row():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 320)).astype(np.float32) * rng.uniform(0.01, 30, (50, 1)).astype(np.float32)
    x[3] = 0.0  # a zero row: scale 0, no division by zero
    q, scale = quantize(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and np.abs(q).max() <= 127
    assert scale[3] == 0 and not q[3].any()
    err = np.abs(dequantize(q, scale) - x)
    assert (err <= scale[:, None] / 2 + 1e-6 * np.abs(x)).all()
    np.testing.assert_allclose(np.abs(dequantize(q, scale)).max(axis=1), np.abs(x).max(axis=1), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_batch_holds_the_stored_rows_and_zeros_only_at_padding(tmp_path, dtype):
    ps = proteins()
    stored = features_of(ps)
    store = gathered(tmp_path, stored, dtype)
    with h5py.File(store, "r") as f:
        assert f["embeddings/0"].dtype == np.dtype(dtype) and f.attrs["dtype"] == dtype
        assert ("scales/1" in f) == (dtype == "int8") and f["checksums/1"].shape == (len(ps),)
    b = builder(store)
    batch = b.build([5, 0, 3], replicate=1, generator=torch.Generator().manual_seed(0))
    assert (batch.esm_scales is not None) == (dtype == "int8")
    got = esm_features(batch, None)  # int8: dequantised here, as on the device
    for n, i in enumerate([5, 0, 3]):
        p = ps[i]
        want = stored[p.id][0][1]
        if dtype == "int8":
            q, scale = quantize(want)
            np.testing.assert_array_equal(batch.esm_features[n, :p.length + 2].numpy(), q)
            np.testing.assert_allclose(got[n, :p.length + 2].numpy(), dequantize(q, scale), rtol=1e-6)
            assert np.abs(got[n, :p.length + 2].numpy() - want).max() <= scale.max() / 2 + 1e-5
        else:
            np.testing.assert_array_equal(got[n, :p.length + 2].numpy(), want.astype(np.float16))
        assert not got[n, p.length + 2:].any()  # padding
    with EmbeddingReader(store) as r:  # the plain reader: float16 (dequantised for int8)
        x, m = r.get(ps[2].id, 0)
        assert x.dtype == np.float16 and np.array_equal(m, stored[ps[2].id][1][0])


def test_int8_halves_the_bytes_per_row(tmp_path):
    """Stored bytes per row of one replicate: dim x 2 + 1 (mask) for float16, dim + 4 (scale) + 1 for int8."""
    dim, rng = 64, np.random.default_rng(2)
    sizes = {}
    for dtype in ("float16", "int8"):
        path = tmp_path / f"{dtype}.h5"
        with ShardWriter(path, dim=dim, replicates=1, attrs=ATTRS, dtype=dtype) as w:
            for i in range(64):  # 65,536 rows: whole chunks of masks and scales
                w.add(f"P{i}", [rng.standard_normal((1024, dim)).astype(np.float32)], [rng.random(1024) < 0.2])
        with h5py.File(path, "r") as f:
            sizes[dtype] = sum(f[f"{g}/0"].id.get_storage_size() for g in ("embeddings", "scales", "masks")
                               if f"{g}/0" in f) / f["offsets"][-1]
    assert sizes["float16"] == pytest.approx(2 * dim + 1, rel=0.01), sizes
    assert sizes["int8"] == pytest.approx(dim + 4 + 1, rel=0.01), sizes  # 1,285 bytes at ESM-2 650M's 1,280


@pytest.mark.parametrize("dtype, dataset", [("float16", "embeddings/1"), ("int8", "embeddings/1"),
                                            ("int8", "scales/1"), ("float16", "masks/1")])
def test_a_flipped_byte_is_refused_on_the_direct_read_and_only_for_its_protein(tmp_path, dtype, dataset):
    ps = proteins()
    store = gathered(tmp_path, features_of(ps), dtype)
    with h5py.File(store, "r") as f:
        offsets = f["offsets"][()]
    victim = 4
    flip_byte(store, dataset, int(offsets[victim]) + 1)
    b = builder(store)
    neighbours = [i for i in range(len(ps)) if i != victim]
    chunk = (int(offsets[victim]) + 1) // CHUNK  # the damaged chunk holds rows of a neighbour too
    assert any(offsets[i] // CHUNK <= chunk <= (offsets[i + 1] - 1) // CHUNK for i in neighbours)
    b.build(neighbours, replicate=1, generator=None)  # their bytes are intact: read and used
    for gen in (torch.Generator().manual_seed(0), None):
        with pytest.raises(PipelineError, match=rf"^{re.escape(str(store))}: protein '{ps[victim].id}' replicate "
                                                r"1: stored data unreadable \(checksum mismatch") as e:
            b.build([0, victim], replicate=1, generator=gen)
        assert "\n" not in str(e.value)
    b.build([0, victim], replicate=0, generator=None)  # the other replicate is intact


def test_a_store_without_per_protein_checksums_is_read_through_hdf5_with_values_checked(tmp_path):
    ps = proteins()
    store = gathered(tmp_path, features_of(ps), "float16")
    with h5py.File(store, "r+") as f:
        del f["checksums/0"], f["checksums/1"]
        f["embeddings/1"][int(f["offsets"][2]) + 1, 0] = np.inf  # h5py rewrites the Fletcher32 sum
    b = builder(store)
    b.build([0, 1, 3], replicate=1, generator=None)
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(store))}: protein 'P2' replicate 1 has NaN/Inf"):
        b.build([2], replicate=1, generator=None)


def test_batch_buffers_are_reused_but_never_under_a_batch_in_use(tmp_path):
    store = gathered(tmp_path, features_of(proteins()), "float16")
    b = builder(store)
    first = b.build([0, 1, 2], replicate=0, generator=None)
    kept = first.esm_features.clone()
    second = b.build([3, 4, 5], replicate=0, generator=None)  # `first` is held: another buffer
    third = b.build([5, 4, 3], replicate=1, generator=None)
    assert torch.equal(first.esm_features, kept)
    pointers = {t.esm_features.untyped_storage().data_ptr() for t in (first, second, third)}
    assert len(pointers) == 3
    address = second.esm_features.untyped_storage().data_ptr()
    del second, third
    again = b.build([0, 1], replicate=1, generator=None)  # a released buffer serves again
    assert again.esm_features.untyped_storage().data_ptr() in pointers - {first.esm_features.untyped_storage().data_ptr()}
    assert torch.equal(first.esm_features, kept)
    del again
    fresh = b.build([3, 4, 5], replicate=0, generator=None)
    assert fresh.esm_features.untyped_storage().data_ptr() in {address} | pointers


def test_a_store_of_another_dtype_is_stale(embedded_project):
    """The embedded project's float16 stores, under a config that asks for int8: refused before use."""
    from conftest import settings_for
    from ptm_mamba.embedding_store import check_store_settings

    root, config = embedded_project
    store = root / "embeddings" / "train_embeddings.h5"
    check_store_settings(store, settings_for(config))
    int8 = dict(config, embedding={**config["embedding"], "dtype": "int8"})
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(store))}: made with embedding.dtype at its default, "
                                            r"but the config gives 'int8'; the embeddings are stale"):
        check_store_settings(store, settings_for(int8))


def test_the_embed_stage_writes_int8_stores_close_to_float16(embedded_project, tmp_path):
    """The same shard embedded by the real (tiny) ESM-2 as float16 and as int8: the int8 rows are the
    float16 rows to within half a quantisation step of each row."""
    from conftest import settings_for
    from ptm_mamba.embed import embed_shard

    root, config = embedded_project
    split = root / "split" / "val.csv"
    stores = {}
    for dtype in ("float16", "int8"):
        cfg = dict(config, embedding={**config["embedding"], "dtype": dtype})
        stores[dtype] = tmp_path / f"{dtype}.h5"
        embed_shard(settings_for(cfg), "val", 0, 2, split, stores[dtype], progress=False)
    with EmbeddingReader(stores["float16"]) as f16, EmbeddingReader(stores["int8"]) as i8:
        assert f16.ids == i8.ids and i8.dtype == "int8"
        for pid in f16.ids:
            for k in range(K):
                a, b = f16.read(pid, k), i8.read(pid, k)
                np.testing.assert_array_equal(a.mask, b.mask)
                step = np.abs(a.features.astype(np.float32)).max(axis=1) / 127
                assert (np.abs(b.float16().astype(np.float32) - a.features) <= step[:, None] * 0.51 + 2e-3).all()
