"""Tests of ptm_mamba.embedding_store on real HDF5 files."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ptm_mamba.embedding_store import FORMAT_VERSION, EmbeddingReader, ShardWriter, gather, validate_shard
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import split_store_path

DIM, K = 16, 2
ATTRS = {
    "esm_model": "esm2_t6_8M_UR50D", "repr_layer": 6, "split": "train", "split_fingerprint": "abc123",
    "mask_prob": 0.15, "mask_seed": 7,
}


def make_proteins(n: int, seed: int, prefix: str = "P", dim: int = DIM) -> dict[str, tuple[list, list]]:
    """n proteins of random length: id -> ([features (L, dim) float32] * K, [mask (L,) bool] * K)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        L = int(rng.integers(1, 40))
        feats = [rng.standard_normal((L, dim)).astype(np.float32) * 3 for _ in range(K)]
        masks = [rng.random(L) < 0.15 for _ in range(K)]
        out[f"{prefix}{seed}_{i}"] = (feats, masks)
    return out


def write_shard(path: Path, proteins: dict, index: int | None = None, num: int | None = None, **attrs) -> Path:
    shard_attrs = {**ATTRS, **attrs}
    if index is not None:
        shard_attrs.update(shard_index=index, num_shards=num)
    with ShardWriter(path, dim=proteins_dim(proteins), replicates=K, attrs=shard_attrs) as w:
        for pid, (feats, masks) in proteins.items():
            w.add(pid, feats, masks)
    return path


def proteins_dim(proteins: dict) -> int:
    return next(iter(proteins.values()))[0][0].shape[1]


def assert_reads(reader: EmbeddingReader, proteins: dict) -> None:
    for pid, (feats, masks) in proteins.items():
        for k in range(K):
            x, m = reader.get(pid, k)
            assert x.dtype == np.float16 and m.dtype == np.bool_
            np.testing.assert_array_equal(x, feats[k].astype(np.float16))
            np.testing.assert_array_equal(m, masks[k])


def three_shards(folder: Path, n: int = 5, dim: int = DIM) -> tuple[list[Path], dict]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, everything = [], {}
    for s in range(3):
        proteins = make_proteins(n, seed=s, dim=dim)
        paths.append(write_shard(folder / f"train_{s}.h5", proteins, index=s, num=3))
        everything.update(proteins)
    return paths, everything


def no_temp_files(folder: Path) -> bool:
    return not any(p.name.startswith(".") for p in folder.iterdir())


def test_round_trip(tmp_path):
    proteins = make_proteins(6, seed=1)
    path = write_shard(tmp_path / "s.h5", proteins)
    validate_shard(path, expected_ids=list(proteins), expected_attrs=ATTRS)
    assert no_temp_files(tmp_path)
    with EmbeddingReader(path) as r:
        assert r.ids == list(proteins) and len(r) == 6
        assert r.attrs["mask_replicates"] == K and r.attrs["dim"] == DIM and r.attrs["complete"] is True
        assert r.attrs["esm_model"] == ATTRS["esm_model"] and r.attrs["mask_prob"] == 0.15
        assert_reads(r, proteins)
        pid = list(proteins)[3]
        assert r.row_count(pid) == proteins[pid][0][0].shape[0]
        assert r.index(pid) == 3
        # get_many in a scrambled order with adjacent proteins (merged reads) and a repeat
        order = [list(proteins)[i] for i in (4, 1, 2, 3, 0, 2)]
        for pid, (x, m) in zip(order, r.get_many(order, 1)):
            np.testing.assert_array_equal(x, proteins[pid][0][1].astype(np.float16))
            np.testing.assert_array_equal(m, proteins[pid][1][1])
        with pytest.raises(PipelineError, match=r"s\.h5: unknown protein id 'nope'"):
            r.get("nope", 0)
        with pytest.raises(PipelineError, match="replicate 2 out of range"):
            r.get(pid, 2)


def test_write_buffer_is_bounded(tmp_path):
    proteins = make_proteins(20, seed=2)
    total = 0
    with ShardWriter(tmp_path / "s.h5", dim=DIM, replicates=K, attrs=ATTRS, buffer_rows=50) as w:
        for pid, (feats, masks) in proteins.items():
            w.add(pid, feats, masks)
            total += feats[0].shape[0]
            assert w.buffered_rows < 50  # flushed as soon as the budget is reached
            assert w.rows_written + w.buffered_rows == total
        assert w.rows_written > 0
    with EmbeddingReader(tmp_path / "s.h5") as r:
        assert_reads(r, proteins)


def test_write_refuses_bad_input(tmp_path):
    L = 5
    good_f, good_m = [np.zeros((L, DIM))] * K, [np.zeros(L, bool)] * K
    with pytest.raises(PipelineError, match="'bad'.*NaN/Inf"):
        with ShardWriter(tmp_path / "s.h5", dim=DIM, replicates=K, attrs=ATTRS) as w:
            w.add("ok", good_f, good_m)
            w.add("bad", [np.zeros((L, DIM)), np.full((L, DIM), np.nan)], good_m)
    with pytest.raises(PipelineError, match="'big'.*NaN/Inf"):  # overflows float16
        with ShardWriter(tmp_path / "s.h5", dim=DIM, replicates=K, attrs=ATTRS) as w:
            w.add("big", [np.full((L, DIM), 1e6)] * K, good_m)
    with pytest.raises(PipelineError, match="'short'.*replicate 1"):
        with ShardWriter(tmp_path / "s.h5", dim=DIM, replicates=K, attrs=ATTRS) as w:
            w.add("short", good_f, [good_m[0], np.zeros(L - 1, bool)])
    with pytest.raises(PipelineError, match="'wide'"):
        with ShardWriter(tmp_path / "s.h5", dim=DIM, replicates=K, attrs=ATTRS) as w:
            w.add("wide", [np.zeros((L, DIM + 1))] * K, good_m)
    with pytest.raises(PipelineError, match="'dup'.*duplicate"):
        with ShardWriter(tmp_path / "s.h5", dim=DIM, replicates=K, attrs=ATTRS) as w:
            w.add("dup", good_f, good_m)
            w.add("dup", good_f, good_m)
    with pytest.raises(PipelineError, match="split_fingerprint"):
        ShardWriter(tmp_path / "s.h5", dim=DIM, replicates=K, attrs={"esm_model": "x"})
    assert not (tmp_path / "s.h5").exists() and no_temp_files(tmp_path)


def test_exception_leaves_nothing(tmp_path):
    proteins = make_proteins(4, seed=3)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "s.h5", dim=DIM, replicates=K, attrs=ATTRS, buffer_rows=1) as w:
            for pid, (feats, masks) in proteins.items():
                w.add(pid, feats, masks)
            assert any(p.name.startswith(".s.h5.tmp-") for p in tmp_path.iterdir())
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_only_an_unusable_temp(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from ptm_mamba.embedding_store import ShardWriter
        with ShardWriter({str(tmp_path / "s.h5")!r}, dim={DIM}, replicates=2, attrs={ATTRS!r}, buffer_rows=8) as w:
            for i in range(10):
                w.add(f"P{{i}}", [np.ones((5, {DIM}))] * 2, [np.zeros(5, bool)] * 2)
            assert w.rows_written > 0
            print(os.getpid(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "s.h5").exists()
    (tmp,) = tmp_path.iterdir()
    assert tmp.name.startswith(".s.h5.tmp-")
    with pytest.raises(PipelineError, match=r"s\.h5: embedding file does not exist"):
        gather([tmp_path / "s.h5"], split_store_path(tmp_path, "train"))
    with pytest.raises(PipelineError, match=str(tmp)):  # not complete, or not even readable
        validate_shard(tmp, expected_ids=None, expected_attrs=ATTRS)
    with pytest.raises(PipelineError, match=str(tmp)):
        gather([tmp], split_store_path(tmp_path, "train"))
    assert not (split_store_path(tmp_path, "train")).exists()


def concatenated(everything: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Replicate k of every protein, in order: the rows of a gathered file's embeddings/<k>, masks/<k>."""
    return (np.concatenate([f[k].astype(np.float16) for f, _ in everything.values()]),
            np.concatenate([m[k] for _, m in everything.values()]))


def test_gather_copies_the_shards_into_real_datasets(tmp_path):
    paths, everything = three_shards(tmp_path / "emb" / "shards", n=8, dim=64)
    out = split_store_path(tmp_path / "emb", "train")
    gather(paths, out, expected_ids=list(everything), expected_attrs=ATTRS)
    assert no_temp_files(tmp_path / "emb")
    with h5py.File(paths[0], "r") as shard, h5py.File(out, "r") as f:
        for name in ["offsets"] + [f"{g}/{k}" for k in range(K) for g in ("embeddings", "masks")]:
            assert not f[name].is_virtual and f[name].fletcher32, name  # real data, checksummed
        for name in [f"{g}/{k}" for k in range(K) for g in ("embeddings", "masks")]:
            d, s = f[name], shard[name]
            assert (d.dtype, d.chunks, d.compression, d.maxshape[1:]) == (s.dtype, s.chunks, s.compression,
                                                                          s.maxshape[1:]), name
        for k in range(K):
            x, m = concatenated(everything, k)
            np.testing.assert_array_equal(f[f"embeddings/{k}"][()], x)
            np.testing.assert_array_equal(f[f"masks/{k}"][()], m)
    array_bytes = sum(f[0][k].nbytes // 2 + f[1][k].nbytes for f in everything.values() for k in range(K))
    assert os.path.getsize(out) > array_bytes, (os.path.getsize(out), array_bytes)  # a copy, not links
    validate_shard(out, expected_ids=list(everything), expected_attrs=ATTRS)
    with EmbeddingReader(out) as r:
        assert r.ids == list(everything)
        assert r.attrs["num_shards"] == 3 and "shard_index" not in r.attrs and "shard_files" not in r.attrs
        assert r.attrs["split_fingerprint"] == ATTRS["split_fingerprint"]
        assert_reads(r, everything)
        ids = list(everything)  # a batch crossing shard boundaries, read in merged runs
        for pid, (x, m) in zip(ids[5:20], r.get_many(ids[5:20], 0)):
            np.testing.assert_array_equal(x, everything[pid][0][0].astype(np.float16))
            np.testing.assert_array_equal(m, everything[pid][1][0])


def test_the_gathered_file_stands_alone(tmp_path, monkeypatch):
    """Copied elsewhere, with the shards deleted: plain h5py and EmbeddingReader read the same values
    (the virtual datasets of before read as NaN there, without error)."""
    paths, everything = three_shards(tmp_path / "emb" / "shards")
    gather(paths, split_store_path(tmp_path / "emb", "train"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(split_store_path(tmp_path / "emb", "train"), elsewhere / "copy.h5")
    shutil.rmtree(tmp_path / "emb")
    monkeypatch.chdir(elsewhere)
    with h5py.File(elsewhere / "copy.h5", "r") as f:
        offsets = f["offsets"][()]
        for k in range(K):
            x, m = concatenated(everything, k)
            np.testing.assert_array_equal(f[f"embeddings/{k}"][()], x)
            np.testing.assert_array_equal(f[f"masks/{k}"][()], m)
            assert np.isfinite(f[f"embeddings/{k}"][()]).all()
        assert [str(i) for i in f["ids"].asstr()[()]] == list(everything)
        pid = list(everything)[7]
        np.testing.assert_array_equal(f["embeddings/1"][offsets[7]:offsets[8]],
                                      everything[pid][0][1].astype(np.float16))
    with EmbeddingReader(elsewhere / "copy.h5") as r:
        assert_reads(r, everything)
    validate_shard(elsewhere / "copy.h5", expected_ids=list(everything), expected_attrs=ATTRS)


@pytest.mark.parametrize("block_bytes", [1, 2000, 64 * 2**20])
def test_gather_streams_in_blocks_of_whole_chunks(tmp_path, monkeypatch, block_bytes):
    """Blocks of one chunk (the least), of a few, or the default budget, with chunks of 7 rows and
    gzip: every row lands where it belongs, stored as the shards were (chunks, compression)."""
    from ptm_mamba import embedding_store

    monkeypatch.setattr(embedding_store, "_CHECK_BLOCK_BYTES", block_bytes)
    (tmp_path / "shards").mkdir()
    paths, everything = [], {}
    for s in range(4):
        proteins = make_proteins(4 + 3 * s, seed=20 + s) if s != 2 else {}  # an empty shard too
        with ShardWriter(tmp_path / "shards" / f"{s}.h5", dim=DIM, replicates=K, chunk_rows=7, compression="gzip",
                         attrs={**ATTRS, "shard_index": s, "num_shards": 4}) as w:
            for pid, (feats, masks) in proteins.items():
                w.add(pid, feats, masks)
        paths.append(tmp_path / "shards" / f"{s}.h5")
        everything.update(proteins)
    out = split_store_path(tmp_path, "train")
    gather(paths, out, expected_ids=list(everything), expected_attrs=ATTRS)
    with h5py.File(out, "r") as f:
        assert f["embeddings/0"].chunks == (7, DIM) and f["embeddings/0"].compression == "gzip"
        for k in range(K):
            x, m = concatenated(everything, k)
            np.testing.assert_array_equal(f[f"embeddings/{k}"][()], x)
            np.testing.assert_array_equal(f[f"masks/{k}"][()], m)
    with EmbeddingReader(out) as r:
        assert_reads(r, everything)


def test_chunk_appender_writes_whole_chunks_in_order(tmp_path):
    from ptm_mamba.embedding_store import _ChunkAppender

    rng = np.random.default_rng(0)
    data = rng.standard_normal((1000, 3)).astype(np.float16)
    cuts = np.sort(rng.choice(np.arange(1, 1000), size=60, replace=False))
    with h5py.File(tmp_path / "a.h5", "w") as f:
        dset = f.create_dataset("x", shape=data.shape, dtype=np.float16, chunks=(16, 3))
        writes = []
        sink = _ChunkAppender(dset)
        sink._write = lambda block, write=sink._write: (writes.append(len(block)), write(block))
        for block in np.split(data, cuts):
            sink.add(block)
        sink.finish()
        np.testing.assert_array_equal(dset[()], data)
    assert all(n % 16 == 0 for n in writes[:-1]) and sum(writes) == 1000, writes  # whole chunks but the last


def test_a_gathered_file_of_virtual_datasets_is_refused(tmp_path):
    """The earlier gather's layout: virtual datasets over the shards. Refused in one line, shards or not."""
    paths, everything = three_shards(tmp_path / "shards")
    old = split_store_path(tmp_path, "train")
    with h5py.File(old, "w") as f:
        offsets, ids = [0], []
        for p in paths:
            with h5py.File(p, "r") as s:
                ids += [str(i) for i in s["ids"].asstr()[()]]
                offsets += list(s["offsets"][1:] + offsets[-1])
                f.attrs.update(s.attrs)
        total = offsets[-1]
        for k in range(K):
            for group, shape, dtype in (("embeddings", (total, DIM), np.float16), ("masks", (total,), np.bool_)):
                layout, start = h5py.VirtualLayout(shape=shape, dtype=dtype), 0
                for p in paths:
                    with h5py.File(p, "r") as s:
                        r = s[f"{group}/{k}"].shape[0]
                    layout[start:start + r] = h5py.VirtualSource(str(p), f"{group}/{k}", shape=(r,) + shape[1:])
                    start += r
                f.create_virtual_dataset(f"{group}/{k}", layout, fillvalue=0)
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("offsets", data=np.array(offsets, dtype=np.int64))
        del f.attrs["shard_index"]
    pattern = rf"^{re.escape(str(old))}: a gathered file of an earlier version .*rerun the embed stage$"
    for use in (lambda: EmbeddingReader(old).ids,
                lambda: validate_shard(old, expected_ids=None, expected_attrs={})):
        with pytest.raises(PipelineError, match=pattern):
            use()


def test_corrupt_shard_names_the_file(tmp_path):
    path = write_shard(tmp_path / "s.h5", make_proteins(20, seed=4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=r"s\.h5.*(truncated|corrupt)"):
        validate_shard(path, expected_ids=None, expected_attrs=ATTRS)
    path.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(PipelineError, match=r"s\.h5.*not a readable HDF5"):
        validate_shard(path, expected_ids=None, expected_attrs=ATTRS)
    write_shard(path, make_proteins(3, seed=4))
    with h5py.File(path, "r+") as f:  # readable, but as if the final commit never happened
        del f.attrs["complete"]
    with pytest.raises(PipelineError, match=r"s\.h5: not marked complete"):
        validate_shard(path, expected_ids=None, expected_attrs=ATTRS)
    with h5py.File(path, "w") as f:  # valid HDF5, wrong content
        f.attrs["complete"] = True
        f.attrs["format_version"], f.attrs["dim"], f.attrs["mask_replicates"] = FORMAT_VERSION, DIM, K
    with pytest.raises(PipelineError, match=r"s\.h5: dataset ids missing"):
        validate_shard(path, expected_ids=None, expected_attrs={})


def test_format_1_store_is_refused_with_a_rerun_hint(tmp_path):
    """Format 1 stored residue rows only (no <cls>/<eos>): reader, validation and gather refuse it in one line."""
    paths, _ = three_shards(tmp_path)
    with h5py.File(paths[0], "r+") as f:
        f.attrs["format_version"] = 1
    pattern = rf"^{re.escape(str(paths[0]))}: format_version 1 .*rerun the embed stage"
    for use in (lambda: EmbeddingReader(paths[0]).ids,
                lambda: validate_shard(paths[0], expected_ids=None, expected_attrs={}),
                lambda: gather(paths, tmp_path / "g.h5")):
        with pytest.raises(PipelineError, match=pattern) as err:
            use()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "g.h5").exists()


def test_nan_in_stored_file_is_found(tmp_path):
    proteins = make_proteins(5, seed=5)
    path = write_shard(tmp_path / "s.h5", proteins)
    with h5py.File(path, "r+") as f:  # damage the data behind the writer's back
        f["embeddings/1"][7, 3] = np.inf
    with pytest.raises(PipelineError, match=r"s\.h5: embeddings/1 has NaN/Inf at row 7"):
        validate_shard(path, expected_ids=None, expected_attrs=ATTRS)
    validate_shard(path, expected_ids=None, expected_attrs=ATTRS, check_values=False)


def test_offsets_inconsistent(tmp_path):
    path = write_shard(tmp_path / "s.h5", make_proteins(5, seed=6))
    with h5py.File(path, "r+") as f:
        f["offsets"][2] = f["offsets"][3] + 1
    with pytest.raises(PipelineError, match=r"s\.h5: offsets inconsistent"):
        validate_shard(path, expected_ids=None, expected_attrs={})


def test_stale_shard_names_the_attr(tmp_path):
    paths, _ = three_shards(tmp_path)
    write_shard(paths[1], make_proteins(5, seed=1), index=1, num=3, split_fingerprint="old")
    with pytest.raises(PipelineError, match=r"train_1\.h5.*split_fingerprint is 'old', expected 'abc123'"):
        validate_shard(paths[1], expected_ids=None, expected_attrs=ATTRS)
    with pytest.raises(PipelineError, match=r"train_1\.h5.*split_fingerprint"):
        gather(paths, tmp_path / "out.h5", expected_attrs=ATTRS)
    # without expected attrs, the shards must still agree with each other
    with pytest.raises(PipelineError, match=r"train_1\.h5.*split_fingerprint is 'old'"):
        gather(paths, tmp_path / "out.h5")
    with pytest.raises(PipelineError, match="esm_model is 'esm2_t6_8M_UR50D', expected 'esm2_t33_650M_UR50D'"):
        validate_shard(paths[0], expected_ids=None, expected_attrs={"esm_model": "esm2_t33_650M_UR50D"})
    assert not (tmp_path / "out.h5").exists()


def test_ids_missing_extra_duplicate(tmp_path):
    paths, everything = three_shards(tmp_path)
    ids = list(everything)
    with pytest.raises(PipelineError, match=r"train_0\.h5: ids differ.*1 missing \(e\.g\. 'X'\), 0 extra"):
        validate_shard(paths[0], expected_ids=ids[:5] + ["X"], expected_attrs={})
    with pytest.raises(PipelineError, match=r"union of 3 shards\): ids differ.*1 missing \(e\.g\. 'X'\), 0 extra"):
        gather(paths, tmp_path / "out.h5", expected_ids=ids + ["X"])
    with pytest.raises(PipelineError, match=rf"0 missing, 1 extra \(e\.g\. '{ids[-1]}'\)"):
        gather(paths, tmp_path / "out.h5", expected_ids=ids[:-1])
    # a protein written to two shards
    dup = {ids[0]: everything[ids[0]], **make_proteins(2, seed=9)}
    write_shard(paths[2], dup, index=2, num=3)
    with pytest.raises(PipelineError, match=rf"train_2\.h5: id '{ids[0]}' also in shard .*train_0\.h5"):
        gather(paths, tmp_path / "out.h5")
    # a shard missing from the list
    with pytest.raises(PipelineError, match=r"shard_index \[0, 1\] and num_shards \[3\]"):
        gather(paths[:2], tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


class _ReaderDataset(torch.utils.data.Dataset):
    """Item i: (features, mask, pid of the process that opened the handle, own pid)."""

    def __init__(self, reader: EmbeddingReader, ids: list[str]):
        self.reader, self.ids = reader, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        x, m = self.reader.get(self.ids[i], i % K)
        return x, m, self.reader._pid, os.getpid()


def test_reader_in_forked_dataloader(tmp_path):
    paths, everything = three_shards(tmp_path / "shards")
    out = split_store_path(tmp_path, "train")
    gather(paths, out)
    reader = EmbeddingReader(out)
    ids = list(everything)
    reader.get(ids[0], 0)  # the parent holds an open handle when the workers fork
    loader = torch.utils.data.DataLoader(
        _ReaderDataset(reader, ids), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    workers = set()
    for i, (x, m, opened_in, pid) in enumerate(loader):
        feats, masks = everything[ids[i]]
        np.testing.assert_array_equal(x.numpy(), feats[i % K].astype(np.float16))
        np.testing.assert_array_equal(m.numpy(), masks[i % K])
        assert opened_in == pid != os.getpid()
        workers.add(pid)
    assert len(workers) == 2
    assert reader._pid == os.getpid()  # the parent's handle is untouched and still works
    assert_reads(reader, everything)


def test_pickle_after_use(tmp_path):
    proteins = make_proteins(4, seed=8)
    reader = EmbeddingReader(write_shard(tmp_path / "s.h5", proteins))
    assert_reads(reader, proteins)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._file is None
    assert_reads(clone, proteins)
    reader.close()
    clone.close()
