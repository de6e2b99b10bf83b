"""HDF5 storage of precomputed ESM-2 embeddings: shard writer, validation, gather, reader.

Per protein of L residues and mask replicate k, the embed stage stores ESM-2 features of the
masked input ``<cls> residues <eos>`` (L+2 rows) plus the bool random mask used (False at
``<cls>``/``<eos>``). One job writes one shard; ``gather`` copies a split's shards into one
self-contained file that plain h5py reads. ``ptm-mamba predict`` writes the same layout. The
store takes any rows per protein; the count is checked where read (``BatchBuilder``).

Layout (a shard and a gathered file look the same to a reader)::

    ids              (n,)            variable-length UTF-8 strings
    offsets          (n+1,) int64    rows of protein i are offsets[i]:offsets[i+1]
    embeddings/<k>   (R, dim) float16, or int8 (``dtype: int8``), chunked, resizable along axis 0
    scales/<k>       (R,) float32, int8 stores only: row r is embeddings/<k>[r] * scales/<k>[r]
    masks/<k>        (R,) bool
    checksums/<k>    (n,) uint64: xxh3_64 of protein i's rows of embeddings/<k>, scales/<k>, masks/<k>
    attrs            split, split_fingerprint, dim, dtype, mask_replicates, format_version,
                     checksum, [shard_index, num_shards | num_shards], complete; the embed
                     stage's also settings, esm_model, repr_layer, mask_prob, mask_seed

``complete`` is set last, before the atomic rename. format_version 1 (no ``<cls>``/``<eos>``
rows) is refused. Staleness is the ``settings`` attribute alone (:func:`check_store_settings`).

Every array but ``ids`` (HDF5 cannot filter variable-length strings) has Fletcher32 checksums
per chunk, so flipped bits on disk fail an h5py read (a one-line PipelineError naming the file)
instead of returning wrong numbers. Values are checked (finite) once, when written.

The training's reads skip HDF5: :class:`EmbeddingReader` reads a protein's rows from the file's
bytes (``pread`` at the chunks' offsets, only the bytes asked for) and verifies them against the
protein's ``checksums/<k>`` (xxh3 at ~20 GB/s), so every read is checked at a few percent of its
cost. Files without ``checksums/<k>`` (written by hand, or by an earlier version) read through
h5py with their values checked on every read; files without any checksum still read, unchecked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple, Sequence

import h5py
import numpy as np
import xxhash

from ptm_mamba.errors import PipelineError
from ptm_mamba.fileio import AtomicFile, write_error
from ptm_mamba.stages import EMBED, FORMATS, check_settings
from ptm_mamba.tokenizer import residue_rows, rows_of

if TYPE_CHECKING:
    from ptm_mamba.dataset import Protein
    from ptm_mamba.settings import Settings

FORMAT_VERSION = FORMATS[EMBED]  # 2: rows <cls>, residues, <eos> per protein (1: residues only)
# Attributes every writer must be given (the others are set by the writer/gather).
REQUIRED_ATTRS = ("split", "split_fingerprint")
SETTINGS_ATTR = "settings"  # the embed stage's settings the rows were made with (JSON)
# Attributes that are bookkeeping, not content: gather does not compare them across shards.
_BOOKKEEPING_ATTRS = ("complete", "shard_index", "num_shards")
_BUFFER_BYTES = 64 * 2**20  # default write buffer per shard (all replicates together)
_CHECK_BLOCK_BYTES = 64 * 2**20  # NaN/Inf scan block size in validate_shard, and gather's copy block
_MASK_CHUNK = 16384
DTYPES = ("float16", "int8")  # embedding.dtype: how features are stored
CHECKSUM = "xxh3_64"  # the attribute ``checksum``: the per-protein hash of checksums/<k>
_INT8_MAX = 127


def quantize(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (rows, dim) as int8 and a float32 scale per row (max |x| / 127; 0 for a zero row)."""
    x = np.asarray(features, dtype=np.float32)
    scale = np.abs(x).max(axis=1) / _INT8_MAX if x.size else np.zeros(len(x), np.float32)
    q = np.rint(x / np.where(scale > 0, scale, 1.0)[:, None])
    return np.clip(q, -_INT8_MAX, _INT8_MAX).astype(np.int8), scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 rows of int8 ``q`` and its per-row ``scale`` (the inverse of :func:`quantize`)."""
    return q.astype(np.float32) * scale[:, None]


def protein_checksum(features: np.ndarray, scales: np.ndarray | None, mask: np.ndarray) -> int:
    """The xxh3_64 of one protein's stored rows: feature bytes, then scale bytes (int8), then mask bytes."""
    h = xxhash.xxh3_64()
    for part in (features, scales, mask):
        if part is not None:
            h.update(np.ascontiguousarray(part))
    return h.intdigest()


def _chunk_rows(dim: int) -> int:
    """Rows per chunk: ~0.5-1 MiB chunks, a power of two in [64, 1024] (1024 for dim 320, 256 for 1280)."""
    rows = 2 ** int(np.floor(np.log2(max(1, 2**20 // (2 * dim)))))
    return int(np.clip(rows, 64, 1024))


def _attr_value(v: Any) -> Any:
    """An HDF5 attribute as a plain Python value (str, int, float, bool or list of those)."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return [_attr_value(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    return {k: _attr_value(v) for k, v in f.attrs.items()}


def _read_ids(f: h5py.File) -> list[str]:
    return [str(x) for x in f["ids"].asstr()[()]]


def _damaged(where: str, e: OSError) -> PipelineError:
    """An HDF5 read failure (checksum mismatch, truncation) as a one-line error."""
    detail = (str(e).splitlines() or [type(e).__name__])[0]
    return PipelineError(f"{where}: stored data unreadable (checksum mismatch, truncated or corrupt file; "
                         f"rerun the embed stage): {detail}")


# What h5py raises for a write that failed: OSError, or RuntimeError for some (a flush: "Can't flush
# cache (file write failed: ... errno = 28, error message = 'No space left on device' ...)").
_H5_WRITE_ERRORS = (OSError, RuntimeError)


def _failure(exc: BaseException) -> BaseException:
    """An HDF5 write's exception as the OSError it stands for (a RuntimeError's message kept)."""
    return OSError(None, str(exc)) if isinstance(exc, RuntimeError) else exc


def _discard(f: h5py.File) -> None:
    """Close ``f`` without writing more: after a failed write (full disk) HDF5's flush on close
    fails again and leaves half-closed objects that segfault at exit, so the descriptor is first
    pointed at an in-memory file. The caller removes the temp file."""
    if not f.id.valid:
        return
    try:
        fd = f.id.get_vfd_handle()
        sink = os.memfd_create("ptm-mamba-discard") if hasattr(os, "memfd_create") else \
            os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(sink, fd)
        finally:
            os.close(sink)
    except (OSError, ValueError, TypeError):  # not a POSIX file driver: close it as it is
        pass
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the file is being thrown away; the write's error is reported
        pass


class _AtomicH5:
    """An HDF5 file written under a temp name (:class:`AtomicFile`), renamed into place on commit;
    a crash leaves only the hidden temp file, without ``complete``."""

    def __init__(self, path: str | os.PathLike):
        self._out = AtomicFile(path)
        self.path, self.tmp = self._out.path, self._out.tmp
        # Datasets held until flush: a failed chunk write in h5py's __dealloc__ (full disk) is
        # lost and leaves HDF5 broken (the later segfault).
        self.kept: list[h5py.Dataset] = []
        try:
            self.file = h5py.File(self.tmp, "w", locking=False)  # see _open
        except _H5_WRITE_ERRORS as exc:
            raise self._out.error(_failure(exc)) from None
        except BaseException:
            self._out.abort()
            raise

    def commit(self) -> None:
        try:
            self.file.attrs["complete"] = True
            self.file.flush()  # a full disk fails here, with every object still open, not mid-close
            self.file.close()
        except _H5_WRITE_ERRORS as exc:
            raise self.error(exc) from None
        self._out.commit()  # removes the temp file itself if the rename fails

    def error(self, exc: BaseException) -> BaseException:
        """Abort; ``exc``, raised while writing, as the error to raise (see :meth:`AtomicFile.error`)."""
        _discard(self.file)
        return self._out.error(_failure(exc))

    def abort(self) -> None:
        _discard(self.file)
        self._out.abort()


class ShardWriter:
    """Appends proteins to one shard file, never holding the shard in RAM (rows buffered in
    blocks of ``buffer_rows``, default a 64 MiB budget); committed on clean exit::

        with ShardWriter(path, dim=320, replicates=2, attrs={...}) as w:
            w.add("P12345", [feat0, feat1], [mask0, mask1])
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dim: int,
        replicates: int,
        attrs: Mapping[str, Any],
        buffer_rows: int | None = None,
        chunk_rows: int | None = None,
        compression: str | None = None,
        dtype: str = "float16",
    ):
        if dim < 1 or replicates < 1:
            raise ValueError(f"dim and replicates must be >= 1, got dim={dim} replicates={replicates}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise PipelineError(f"{path}: shard attributes missing: {', '.join(missing)}")
        fixed = {"dim": dim, "mask_replicates": replicates, "dtype": dtype, "format_version": FORMAT_VERSION,
                 "checksum": CHECKSUM}
        for k, v in fixed.items():
            if k in attrs and attrs[k] != v:
                raise PipelineError(f"{path}: attribute {k}={attrs[k]!r} contradicts the writer's {v!r}")
        self.path = Path(path)
        self.dim, self.replicates, self.dtype = dim, replicates, dtype
        self.int8 = dtype == "int8"
        self.attrs = {**{k: _attr_value(v) for k, v in attrs.items()}, **fixed}  # numpy scalars -> Python
        self.buffer_rows = buffer_rows or max(1, _BUFFER_BYTES // (np.dtype(dtype).itemsize * dim * replicates))
        self.chunk_rows = chunk_rows or _chunk_rows(dim)
        self.compression = compression
        self._out: _AtomicH5 | None = None

    def __enter__(self) -> "ShardWriter":
        self._out = out = _AtomicH5(self.path)
        try:
            f = out.file
            self._emb = [
                f.create_dataset(
                    f"embeddings/{k}", shape=(0, self.dim), maxshape=(None, self.dim), dtype=self.dtype,
                    chunks=(self.chunk_rows, self.dim), compression=self.compression, fletcher32=True,
                )
                for k in range(self.replicates)
            ]
            self._mask = [self._rows_dataset(f, f"masks/{k}", bool) for k in range(self.replicates)]
            self._scale = [self._rows_dataset(f, f"scales/{k}", np.float32) for k in range(self.replicates)] \
                if self.int8 else []
        except _H5_WRITE_ERRORS as exc:
            self._out = None
            raise out.error(exc) from None
        except BaseException:
            self._out = None
            out.abort()
            raise
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._offsets = [0]
        self._checksums: list[list[int]] = [[] for _ in range(self.replicates)]
        self._buf_feat: list[list[np.ndarray]] = [[] for _ in range(self.replicates)]
        self._buf_mask: list[list[np.ndarray]] = [[] for _ in range(self.replicates)]
        self._buf_scale: list[list[np.ndarray]] = [[] for _ in range(self.replicates)]
        self.buffered_rows = 0
        return self

    @staticmethod
    def _rows_dataset(f: h5py.File, name: str, dtype) -> h5py.Dataset:
        """A resizable (rows,) dataset beside the features (masks, scales)."""
        return f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(_MASK_CHUNK,),
                                fletcher32=True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        out, self._out = self._out, None
        if exc_type is not None:  # a write that failed in add() is a WriteError already
            out.abort()
            return False
        try:
            self._flush()
            f = out.file
            out.kept += [
                f.create_dataset("ids", data=np.array(self._ids, dtype=object), dtype=h5py.string_dtype("utf-8")),
                f.create_dataset("offsets", data=np.array(self._offsets, dtype=np.int64), fletcher32=True),
                *(f.create_dataset(f"checksums/{k}", data=np.array(c, dtype=np.uint64), fletcher32=True)
                  for k, c in enumerate(self._checksums)),
            ]
            for k, v in self.attrs.items():
                f.attrs[k] = v
        except _H5_WRITE_ERRORS as exc:
            raise out.error(exc) from None
        except BaseException:
            out.abort()
            raise
        out.commit()
        return False

    def add_dataset(self, name: str, data: np.ndarray, **attrs: Any) -> None:
        """Store one more array (with checksums), committed with the file (``predict``'s pooled states)."""
        if self._out is None:
            raise RuntimeError("ShardWriter.add_dataset outside of its `with` block")
        if name.split("/")[0] in ("ids", "offsets", "embeddings", "masks", "scales", "checksums"):
            raise ValueError(f"{name!r} is a dataset of the store layout")
        try:
            dset = self._out.file.create_dataset(name, data=data, fletcher32=True)
            self._out.kept.append(dset)
            for k, v in attrs.items():
                dset.attrs[k] = v
        except _H5_WRITE_ERRORS as exc:
            raise write_error(self.path, _failure(exc)) from None

    @property
    def rows_written(self) -> int:
        """Rows already in the HDF5 file (not counting the buffer)."""
        return int(self._emb[0].shape[0])

    def add(self, id: str, features: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
        """Append one protein: ``features[k]`` (rows, dim) and ``masks[k]`` (rows,) bool per replicate."""
        if self._out is None:
            raise RuntimeError("ShardWriter.add outside of its `with` block")
        where = f"{self.path}: protein {id!r}"
        if not id or id in self._seen:
            raise PipelineError(f"{where}: empty or duplicate id")
        if len(features) != self.replicates or len(masks) != self.replicates:
            raise PipelineError(
                f"{where}: got {len(features)} feature and {len(masks)} mask replicates, expected {self.replicates}"
            )
        with np.errstate(over="ignore"):  # overflow becomes Inf, refused below
            feats = [np.asarray(x, dtype=np.float32 if self.int8 else np.float16) for x in features]
        msks = [np.asarray(m) for m in masks]
        L = feats[0].shape[0] if feats[0].ndim == 2 else -1
        for k, (x, m) in enumerate(zip(feats, msks)):
            if x.shape != (L, self.dim) or m.shape != (L,):
                raise PipelineError(
                    f"{where} replicate {k}: features {x.shape} / mask {m.shape}, expected ({L}, {self.dim}) / ({L},)"
                )
            if m.dtype != np.bool_:
                raise PipelineError(f"{where} replicate {k}: mask dtype {m.dtype}, expected bool")
            if not np.isfinite(x).all():  # the one check of the values: reads verify the checksum instead
                raise PipelineError(f"{where} replicate {k}: features contain NaN/Inf (after {x.dtype} cast)")
        for k in range(self.replicates):
            stored, scale = quantize(feats[k]) if self.int8 else (feats[k], None)
            self._buf_feat[k].append(stored)
            self._buf_mask[k].append(msks[k])
            if scale is not None:
                self._buf_scale[k].append(scale)
            self._checksums[k].append(protein_checksum(stored, scale, msks[k]))
        self._ids.append(id)
        self._seen.add(id)
        self._offsets.append(self._offsets[-1] + L)
        self.buffered_rows += L
        if self.buffered_rows >= self.buffer_rows:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered rows of every replicate in one block each."""
        if self.buffered_rows == 0:
            return
        start = self.rows_written
        end = start + self.buffered_rows
        try:
            for k in range(self.replicates):
                self._emb[k].resize(end, axis=0)
                self._emb[k][start:end] = np.concatenate(self._buf_feat[k])
                self._mask[k].resize((end,))
                self._mask[k][start:end] = np.concatenate(self._buf_mask[k])
                if self.int8:
                    self._scale[k].resize((end,))
                    self._scale[k][start:end] = np.concatenate(self._buf_scale[k])
                for buf in (self._buf_feat, self._buf_mask, self._buf_scale):
                    buf[k].clear()
        except _H5_WRITE_ERRORS as exc:  # a full disk: one line naming the shard (the `with` removes the temp file)
            raise write_error(self.path, _failure(exc)) from None
        self.buffered_rows = 0


def _check_layout(f: h5py.File, where: str) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Structural checks shared by shards and gathered files; returns (ids, offsets, attrs)."""
    attrs = _read_attrs(f)
    if not attrs.get("complete", False):
        raise PipelineError(f"{where}: not marked complete (an interrupted or foreign write)")
    version = attrs.get("format_version")
    if version == 1:
        raise PipelineError(f"{where}: format_version 1 (residue rows only, from an older version); this version "
                            f"needs format {FORMAT_VERSION} with <cls>/<eos> rows: rerun the embed stage "
                            "(or ptm-mamba predict, for a predictions file)")
    if version != FORMAT_VERSION:
        raise PipelineError(f"{where}: format_version {version!r}, expected {FORMAT_VERSION}")
    for key in ("dim", "mask_replicates"):
        if not isinstance(attrs.get(key), int):
            raise PipelineError(f"{where}: attribute {key} missing or not an integer")
    dim, K, dtype = attrs["dim"], attrs["mask_replicates"], attrs.get("dtype", "float16")
    if dtype not in DTYPES:
        raise PipelineError(f"{where}: attribute dtype is {dtype!r}, expected one of {', '.join(DTYPES)}")
    names = ["ids", "offsets"] + _store_datasets(K, dtype)
    if attrs.get("checksum", CHECKSUM) != CHECKSUM:
        raise PipelineError(f"{where}: attribute checksum is {attrs['checksum']!r}, expected {CHECKSUM!r}")
    for name in names:
        if not isinstance(f.get(name), h5py.Dataset):
            raise PipelineError(f"{where}: dataset {name} missing")
    ids = _read_ids(f)
    offsets = f["offsets"][()]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PipelineError(f"{where}: duplicate id {dup!r}")
    if (
        offsets.shape != (len(ids) + 1,)
        or offsets[0] != 0
        or np.any(np.diff(offsets) < 0)
    ):
        raise PipelineError(f"{where}: offsets inconsistent (shape {offsets.shape} for {len(ids)} ids, or not increasing from 0)")
    rows = int(offsets[-1])
    for k in range(K):
        emb, mask = f[f"embeddings/{k}"], f[f"masks/{k}"]
        if emb.shape != (rows, dim) or emb.dtype != np.dtype(dtype):
            raise PipelineError(f"{where}: embeddings/{k} is {emb.dtype}{emb.shape}, expected {dtype}({rows}, {dim})")
        extra = {f"masks/{k}": ((rows,), np.bool_), f"checksums/{k}": ((len(ids),), np.uint64)}
        if dtype == "int8":
            extra[f"scales/{k}"] = ((rows,), np.float32)
        for name, (shape, kind) in extra.items():
            if name in f and (f[name].shape != shape or f[name].dtype != kind):
                raise PipelineError(f"{where}: {name} is {f[name].dtype}{f[name].shape}, expected "
                                    f"{np.dtype(kind)}{shape}")
        if emb.is_virtual or mask.is_virtual:  # HDF5 reads a missing source as fill values, without error
            raise PipelineError(f"{where}: a gathered file of an earlier version (HDF5 virtual datasets over "
                                "shard files, which read as NaN once the shards are gone); delete it and rerun "
                                "the embed stage")
    return ids, offsets, attrs


def _check_ids(found: Sequence[str], expected: Sequence[str], where: str) -> None:
    """Raise unless ``found`` and ``expected`` hold the same ids (order free, no duplicates)."""
    f, e = set(found), set(expected)
    if len(e) != len(expected):
        raise PipelineError(f"{where}: the expected id list itself has duplicates")
    if f != e or len(found) != len(f):
        missing, extra = sorted(e - f), sorted(f - e)
        parts = [f"{len(missing)} missing" + (f" (e.g. {missing[0]!r})" if missing else ""),
                 f"{len(extra)} extra" + (f" (e.g. {extra[0]!r})" if extra else "")]
        if len(found) != len(f):
            parts.append(f"{len(found) - len(f)} duplicated")
        raise PipelineError(f"{where}: ids differ from expected: {', '.join(parts)}")


def _check_attrs(attrs: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    for key, want in expected.items():
        if key not in attrs:
            raise PipelineError(f"{where}: attribute {key} missing, expected {want!r}")
        if attrs[key] != _attr_value(want):
            raise PipelineError(f"{where}: attribute {key} is {attrs[key]!r}, expected {want!r} (stale file?)")


_SCAN_PIECE = 2**20  # values scanned for NaN/Inf at once: temporaries of a few MiB, not a block's size


def _first_nonfinite_row(block: np.ndarray) -> int | None:
    """First row of float ``block`` with NaN/Inf, or None; for float16, bit ops (~10x faster than ``np.isfinite``)."""
    width = max(1, int(np.prod(block.shape[1:])))
    if block.dtype != np.float16:
        bad = ~np.isfinite(block.reshape(-1))
        return int(np.argmax(bad)) // width if bad.any() else None
    bits = block.reshape(-1).view(np.uint16)
    for a in range(0, bits.size, _SCAN_PIECE):
        bad = (bits[a:a + _SCAN_PIECE] & 0x7C00) == 0x7C00
        if bad.any():
            return (a + int(np.argmax(bad))) // width
    return None


def _blocks(dset: h5py.Dataset, path: Path, name: str, check_values: bool) -> Iterator[np.ndarray]:
    """The rows of ``dset`` in whole-chunk blocks of ~``_CHECK_BLOCK_BYTES`` in one reused buffer (a
    block is valid until the next); with ``check_values``, NaN/Inf is refused."""
    row_bytes = dset.dtype.itemsize * int(np.prod(dset.shape[1:]))
    step = max(1, _CHECK_BLOCK_BYTES // max(1, row_bytes))
    if dset.chunks:
        step = max(1, step // dset.chunks[0]) * dset.chunks[0]
    buffer = np.empty((min(step, len(dset)),) + dset.shape[1:], dtype=dset.dtype)
    for start in range(0, len(dset), step):
        stop = min(start + step, len(dset))
        block = buffer[:stop - start]
        try:
            dset.read_direct(block, np.s_[start:stop], np.s_[0:stop - start])
        except OSError as e:
            raise _damaged(f"{path}: {name} rows {start}..{stop - 1}", e) from None
        if check_values and block.dtype in (np.float16, np.float32):
            row = _first_nonfinite_row(block)
            if row is not None:
                raise PipelineError(f"{path}: {name} has NaN/Inf at row {start + row}")
        yield block


def _store_datasets(K: int, dtype: str = "float16") -> list[str]:
    """The row arrays of a store (not ids, offsets, checksums)."""
    groups = ("embeddings", "masks", "scales") if dtype == "int8" else ("embeddings", "masks")
    return [f"{g}/{k}" for k in range(K) for g in groups]


def _check_values(f: h5py.File, attrs: dict, path: Path) -> None:
    """Read every array block by block (verifying checksums); refuse NaN/Inf features."""
    for name in _store_datasets(attrs["mask_replicates"], attrs.get("dtype", "float16")):
        for _ in _blocks(f[name], path, name, check_values=True):
            pass


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise PipelineError(f"{path}: embedding file does not exist")
    try:
        # No chunk cache: partial-chunk reads were ~1.5-2.5x slower with it (measured). No locks:
        # files are read only after the atomic rename, and flock fails on cluster filesystems.
        return h5py.File(path, "r", rdcc_nbytes=0, locking=False)
    except OSError as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise PipelineError(f"{path}: not a readable HDF5 file (truncated or corrupt): {detail}") from None


def _validate(path: Path, expected_ids, expected_attrs, check_values: bool):
    """validate_shard's body; returns (ids, offsets, attrs) for gather."""
    f = _open(path)
    try:
        with f:
            ids, offsets, attrs = _check_layout(f, str(path))
            if expected_ids is not None:
                _check_ids(ids, expected_ids, str(path))
            _check_attrs(attrs, expected_attrs or {}, str(path))
            if check_values:
                _check_values(f, attrs, path)
    except OSError as e:  # damage found while reading ids/offsets
        raise _damaged(str(path), e) from None
    return ids, offsets, attrs


def validate_shard(
    path: str | os.PathLike,
    *,
    expected_ids: Sequence[str] | None,
    expected_attrs: Mapping[str, Any],
    check_values: bool = True,
) -> None:
    """Raise PipelineError (one line naming ``path``) unless it is a complete, consistent shard
    or gathered file: ``complete`` set, consistent shapes, ids == ``expected_ids`` (as a set),
    ``expected_attrs`` equal, and (``check_values``) valid checksums and no NaN/Inf."""
    _validate(Path(path), expected_ids, expected_attrs, check_values)


class _Shard(NamedTuple):
    path: Path
    ids: list[str]
    offsets: np.ndarray
    attrs: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])


class _ChunkAppender:
    """Appends row blocks to a chunked dataset, writing whole chunks only (a partial chunk waits):
    otherwise every chunk across a shard boundary would be written twice, with a read-back."""

    def __init__(self, dset: h5py.Dataset):
        self.dset, self.chunk = dset, dset.chunks[0]
        self.written = 0
        self.waiting: list[np.ndarray] = []
        self.waiting_rows = 0

    def _write(self, data: np.ndarray) -> None:
        self.dset[self.written:self.written + len(data)] = data
        self.written += len(data)

    def add(self, block: np.ndarray) -> None:
        i = 0
        if self.waiting_rows:  # complete the waiting chunk first
            i = min(len(block), self.chunk - self.waiting_rows)
            self.waiting.append(block[:i].copy())  # ``block`` is a reused buffer: keep nothing of it
            self.waiting_rows += i
            if self.waiting_rows < self.chunk:
                return
            self._write(np.concatenate(self.waiting))
            self.waiting, self.waiting_rows = [], 0
        whole = (len(block) - i) // self.chunk * self.chunk
        if whole:
            self._write(block[i:i + whole])  # a view: no copy
        rest = block[i + whole:]
        if len(rest):
            self.waiting, self.waiting_rows = [rest.copy()], len(rest)

    def finish(self) -> None:
        if self.waiting_rows:
            self._write(np.concatenate(self.waiting))
            self.waiting, self.waiting_rows = [], 0
        if self.written != len(self.dset):  # a shard changed under the gather (checked there): never seen
            raise PipelineError(f"{self.dset.file.filename}: gather wrote {self.written} rows of "
                                f"{self.dset.name}, expected {len(self.dset)}")


def _checksums_of(path: Path, K: int) -> list[np.ndarray] | None:
    """A store's per-protein checksums, ``checksums/<k>`` for every replicate; None without them."""
    with _open(path) as f:
        if not all(f"checksums/{k}" in f for k in range(K)):
            return None
        try:
            return [f[f"checksums/{k}"][()].astype(np.uint64) for k in range(K)]
        except OSError as e:
            raise _damaged(f"{path}: checksums", e) from None


def _create_like(f: h5py.File, name: str, src: h5py.Dataset, rows: int) -> h5py.Dataset:
    """An empty dataset of ``rows`` rows stored like ``src``, always with Fletcher32 checksums."""
    shape = (rows,) + src.shape[1:]
    if src.chunks:
        chunks = src.chunks
    else:  # a contiguous source: the writer's chunk shape
        chunks = (_chunk_rows(shape[1]), shape[1]) if len(shape) == 2 else (_MASK_CHUNK,)
    return f.create_dataset(name, shape=shape, maxshape=(None,) + shape[1:], dtype=src.dtype, chunks=chunks,
                            compression=src.compression, compression_opts=src.compression_opts,
                            shuffle=src.shuffle, fletcher32=True)


def gather(
    shard_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    expected_ids: Sequence[str] | None = None,
    expected_attrs: Mapping[str, Any] | None = None,
    check_values: bool = True,
) -> None:
    """Join shards, in ``shard_paths`` order, into one self-contained file ``out_path`` (atomic).

    Layouts, ids and attributes are checked before anything is written; arrays are read once in
    whole-chunk blocks (memory bounded whatever the split's size), verified, and written as read.
    """
    out_path = Path(out_path)
    if not shard_paths:
        raise PipelineError(f"{out_path}: no shards to gather")
    shards = [_Shard(Path(p), *_validate(Path(p), None, expected_attrs, False)) for p in shard_paths]

    ref = shards[0]
    content = {k: v for k, v in ref.attrs.items() if k not in _BOOKKEEPING_ATTRS}
    for s in shards[1:]:
        _check_attrs(s.attrs, content, f"{s.path} (compared with {ref.path.name})")
        extra = set(s.attrs) - set(content) - set(_BOOKKEEPING_ATTRS)
        if extra:
            raise PipelineError(f"{s.path}: attribute {sorted(extra)[0]} not present in {ref.path.name}")
    n = len(shards)
    indices = sorted(s.attrs.get("shard_index", -1) for s in shards)
    counts = sorted({s.attrs.get("num_shards") for s in shards}, key=str)
    if "shard_index" in ref.attrs and (indices != list(range(n)) or counts != [n]):
        raise PipelineError(
            f"{out_path}: the {n} shards given have shard_index {indices} and num_shards {counts}, "
            f"expected 0..{n - 1} of {n} (a shard missing or stale?)"
        )

    owner: dict[str, Path] = {}
    for s in shards:
        for i in s.ids:
            if i in owner:
                raise PipelineError(f"{s.path}: id {i!r} also in shard {owner[i]}")
            owner[i] = s.path
    all_ids = [i for s in shards for i in s.ids]
    if expected_ids is not None:
        _check_ids(all_ids, expected_ids, f"{out_path} (union of {n} shards)")

    rows = [s.rows for s in shards]
    starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    total = int(starts[-1])
    offsets = np.concatenate([[0]] + [s.offsets[1:] + st for s, st in zip(shards, starts)])
    K = ref.attrs["mask_replicates"]
    names = _store_datasets(K, ref.attrs.get("dtype", "float16"))
    # Shards with per-protein checksums had their values checked when written: the copy verifies
    # Fletcher32 (HDF5 does, reading) and carries the checksums over, without a second look at the values.
    sums = [_checksums_of(s.path, K) for s in shards]
    checksummed = all(x is not None for x in sums)
    check_values = check_values and not checksummed

    out = _AtomicH5(out_path)
    try:
        f = out.file
        out.kept += [f.create_dataset("ids", data=np.array(all_ids, dtype=object), dtype=h5py.string_dtype("utf-8")),
                     f.create_dataset("offsets", data=offsets.astype(np.int64), fletcher32=True)]
        if checksummed:
            out.kept += [f.create_dataset(f"checksums/{k}", data=np.concatenate([x[k] for x in sums]),
                                          fletcher32=True) for k in range(K)]
        with _open(ref.path) as first:
            sinks = {}
            for name in names:
                dset = _create_like(f, name, first[name], total)
                dset.attrs.update(first[name].attrs)
                out.kept.append(dset)
                sinks[name] = _ChunkAppender(dset)
        for s in shards:
            with _open(s.path) as src:
                for name in names:
                    if src[name].shape[0] != s.rows:  # replaced since it was checked above
                        raise PipelineError(f"{s.path}: changed while being gathered ({name} has "
                                            f"{src[name].shape[0]} rows, its offsets said {s.rows})")
                    for block in _blocks(src[name], s.path, name, check_values):
                        sinks[name].add(block)
        for sink in sinks.values():
            sink.finish()
        for k, v in content.items():
            f.attrs[k] = v
        f.attrs["num_shards"] = len(shards)
    except _H5_WRITE_ERRORS as exc:  # reading a shard fails as a PipelineError (_blocks, _open)
        raise out.error(exc) from None
    except BaseException:
        out.abort()
        raise
    out.commit()


def plan_shards(proteins: list[Protein], num_shards: int) -> list[list[Protein]]:
    """Cut a split into ``num_shards`` parts of about equal residue counts (the embed stage's shards).

    Longest first onto the lightest shard (ties by index); each keeps the split's order. Deterministic.
    """
    loads = [0] * num_shards
    members: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(proteins)), key=lambda i: (-proteins[i].length, i)):
        s = min(range(num_shards), key=lambda s: (loads[s], s))
        loads[s] += proteins[i].length
        members[s].append(i)
    return [[proteins[i] for i in sorted(m)] for m in members]


def check_store_settings(path: str | os.PathLike, settings: Settings) -> None:
    """Refuse embeddings (a shard or a gathered file) made with other embed-stage settings than
    ``settings``' (e.g. another ESM-2 checkpoint or mask_prob), in one line naming the key."""
    with EmbeddingReader(path) as store:
        recorded = store.attrs.get(SETTINGS_ATTR)
    try:
        recorded = json.loads(recorded) if isinstance(recorded, str) else None
    except ValueError:
        recorded = None
    check_settings(recorded, settings, EMBED, str(path), "the embeddings are stale, rerun the embed stage")


class StoredRows(NamedTuple):
    """One protein's rows of one replicate, as stored (checked against its checksum)."""

    features: np.ndarray  # (rows, dim) float16, or int8 with ``scales``
    scales: np.ndarray | None  # (rows,) float32 of an int8 store
    mask: np.ndarray  # (rows,) bool

    def float16(self) -> np.ndarray:
        return self.features if self.scales is None else dequantize(self.features, self.scales).astype(np.float16)


_RAW_FILTERS = (h5py.h5z.FILTER_FLETCHER32,)  # a checksum after a chunk's bytes: the bytes are the rows


class _RawRows:
    """Where the rows of a dataset lie in its file, for reads that skip HDF5 (``pread`` of the bytes).

    Possible when no filter but Fletcher32 is on the data and a chunk spans whole rows: rows a:b
    of one chunk are then ``(b - a) * row_bytes`` contiguous bytes, and a read fetches only those.
    """

    def __init__(self, row_bytes: int, chunk_rows: int, offsets: np.ndarray):
        self.row_bytes, self.chunk_rows, self.offsets = row_bytes, chunk_rows, offsets

    @classmethod
    def of(cls, dset: h5py.Dataset) -> "_RawRows | None":
        plist = dset.id.get_create_plist()
        if any(plist.get_filter(i)[0] not in _RAW_FILTERS for i in range(plist.get_nfilters())):
            return None
        rows, row_bytes = dset.shape[0], dset.dtype.itemsize * int(np.prod(dset.shape[1:]))
        if rows == 0:
            return cls(row_bytes, 1, np.zeros(0, np.int64))
        if dset.chunks is None:
            offset = dset.id.get_offset()
            return None if offset is None else cls(row_bytes, rows, np.array([offset], np.int64))
        if tuple(dset.chunks[1:]) != tuple(dset.shape[1:]):
            return None
        chunk_rows = dset.chunks[0]
        offsets = np.full(-(-rows // chunk_rows), -1, np.int64)

        def visit(info) -> None:
            offsets[info.chunk_offset[0] // chunk_rows] = info.byte_offset

        dset.id.chunk_iter(visit)
        return None if (offsets < 0).any() else cls(row_bytes, chunk_rows, offsets)  # unwritten: HDF5's fill

    def read(self, fd: int, a: int, b: int, out: np.ndarray) -> bool:
        """Rows a:b into C-contiguous ``out``; False on a short read (a truncated file)."""
        view, pos, row = memoryview(out.reshape(-1).view(np.uint8)), 0, a
        while row < b:
            chunk = row // self.chunk_rows
            end = min(b, (chunk + 1) * self.chunk_rows)
            offset = int(self.offsets[chunk]) + (row - chunk * self.chunk_rows) * self.row_bytes
            stop = pos + (end - row) * self.row_bytes
            while pos < stop:
                got = os.preadv(fd, [view[pos:stop]], offset)
                if got <= 0:
                    return False
                pos, offset = pos + got, offset + got
            row = end
        return True


class _Replicate(NamedTuple):
    """One replicate's datasets, and their raw locations when every one has them."""

    features: h5py.Dataset
    scales: h5py.Dataset | None
    mask: h5py.Dataset
    raw: tuple[_RawRows | None, ...] | None


class EmbeddingReader:
    """Reads one protein's (or a batch's) embeddings of one replicate from a shard or gathered file.

    Each read is checked: against the protein's checksum (reading the bytes directly, see the module
    docstring), else through HDF5's Fletcher32 with the values checked. The handles are reopened
    when ``os.getpid()`` changes: HDF5 handles must not cross a fork.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._fd: int | None = None
        self._pid: int | None = None
        self._reps: list[_Replicate] = []
        self._checksums: dict[int, np.ndarray | None] = {}
        self._meta: tuple[list[str], dict[str, int], np.ndarray, dict[str, Any]] | None = None

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # Drop the parent's handle and datasets, so HDF5 does not hand back its file id.
            self._file, self._fd, self._reps, self._checksums = None, None, [], {}
            f = _open(self.path)
            try:
                if self._meta is None:
                    ids, offsets, attrs = _check_layout(f, str(self.path))
                    self._meta = (ids, {i: n for n, i in enumerate(ids)}, offsets, attrs)
                attrs = self._meta[3]
                for k in range(attrs["mask_replicates"]):
                    parts = (f[f"embeddings/{k}"], f[f"scales/{k}"] if self.dtype == "int8" else None,
                             f[f"masks/{k}"])
                    raw = tuple(None if d is None else _RawRows.of(d) for d in parts)
                    usable = all(r is not None for r, d in zip(raw, parts) if d is not None)
                    self._reps.append(_Replicate(*parts, raw if usable else None))
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:  # ids/offsets unreadable
                f.close()
                raise _damaged(str(self.path), e) from None
            except BaseException:
                f.close()
                raise
            self._file, self._pid = f, os.getpid()
        return self._file

    def _metadata(self):
        if self._meta is None:
            self._h5()
        return self._meta

    @property
    def ids(self) -> list[str]:
        return self._metadata()[0]

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._metadata()[3])

    @property
    def dtype(self) -> str:
        """How the features are stored: float16, or int8 with a float32 scale per row."""
        return self._metadata()[3].get("dtype", "float16")

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, id: str) -> int:
        try:
            return self._metadata()[1][id]
        except KeyError:
            raise PipelineError(f"{self.path}: unknown protein id {id!r}") from None

    def row_counts(self, ids: Sequence[str]) -> np.ndarray:
        """Stored rows (not residues: the embed stage stores L + 2) per protein of ``ids``, int64."""
        offsets = self._metadata()[2]
        i = np.array([self.index(x) for x in ids], dtype=np.int64)
        return offsets[i + 1] - offsets[i]

    def row_count(self, id: str) -> int:
        """Stored rows of protein ``id`` (see :meth:`row_counts`)."""
        return int(self.row_counts([id])[0])

    def _replicate(self, replicate: int) -> _Replicate:
        self._h5()
        K = len(self._reps)
        if not 0 <= replicate < K:
            raise PipelineError(f"{self.path}: replicate {replicate} out of range 0..{K - 1}")
        return self._reps[replicate]

    def _datasets(self, replicate: int) -> tuple[h5py.Dataset, h5py.Dataset]:
        rep = self._replicate(replicate)
        return rep.features, rep.mask

    def _checksum(self, replicate: int, index: int) -> int | None:
        """Protein ``index``'s checksum in ``replicate``, or None for a store without them."""
        if replicate not in self._checksums:
            name = f"checksums/{replicate}"
            f = self._h5()
            try:
                self._checksums[replicate] = f[name][()] if name in f else None
            except OSError as e:
                raise _damaged(f"{self.path}: {name}", e) from None
        table = self._checksums[replicate]
        return None if table is None else int(table[index])

    def _read_h5(self, rep: _Replicate, a: int, b: int, what: str) -> StoredRows:
        """Rows a:b through HDF5 (Fletcher32 verified); a failed checksum or truncated file is a PipelineError."""
        try:
            return StoredRows(rep.features[a:b], None if rep.scales is None else rep.scales[a:b], rep.mask[a:b])
        except OSError as e:
            raise _damaged(f"{self.path}: {what}", e) from None

    def read(self, id: str, replicate: int, out: np.ndarray | None = None, *, direct: bool = True) -> StoredRows:
        """Protein ``id``'s rows of one replicate as stored, checked; features into ``out`` when given
        (C-contiguous, (rows, dim), the store's dtype: e.g. a slice of a batch buffer). ``direct``:
        the file's bytes checked by the protein's checksum where the store has them (the training's
        reads), else through HDF5, which also checks the Fletcher32 sums of every chunk touched."""
        _, _, offsets, attrs = self._metadata()
        i = self.index(id)
        a, b = int(offsets[i]), int(offsets[i + 1])
        rep = self._replicate(replicate)
        features = np.empty((b - a, attrs["dim"]), rep.features.dtype) if out is None else out
        if features.shape != (b - a, attrs["dim"]) or features.dtype != rep.features.dtype:
            raise ValueError(f"out is {features.dtype}{features.shape}, protein {id!r} needs "
                             f"{rep.features.dtype}{(b - a, attrs['dim'])}")
        rows = StoredRows(features, None if rep.scales is None else np.empty(b - a, np.float32),
                          np.empty(b - a, np.bool_))
        what = f"protein {id!r} replicate {replicate}"
        expected = self._checksum(replicate, i)
        if direct and rep.raw is not None and expected is not None:
            if all(raw.read(self._fd, a, b, part) for raw, part in zip(rep.raw, rows) if raw is not None) and \
                    protein_checksum(*rows) == expected:
                return rows
        else:
            stored = self._read_h5(rep, a, b, what)
            for part, value in zip(rows, stored):
                if part is not None:
                    part[...] = value
            if expected is None:
                self._check_finite(rows, what)
                return rows
            if protein_checksum(*rows) == expected:
                return rows
        self._check_finite(self._read_h5(rep, a, b, what), what)  # name the damage HDF5 or the values show
        raise PipelineError(f"{self.path}: {what}: stored data unreadable (checksum mismatch: its rows' "
                            f"{CHECKSUM} differs from the one the embed stage wrote; truncated or corrupt file; "
                            "rerun the embed stage)")

    def _check_finite(self, rows: StoredRows, what: str) -> None:
        for part in (rows.features, rows.scales):
            if part is not None and part.dtype.kind == "f" and _first_nonfinite_row(part) is not None:
                raise PipelineError(f"{self.path}: {what} has NaN/Inf embeddings (rerun the embed stage)")

    def get(self, id: str, replicate: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (rows, dim) float16 (an int8 store's dequantised) and mask (rows,) bool of
        protein ``id``, one replicate."""
        rows = self.read(id, replicate, direct=False)
        return rows.float16(), rows.mask

    def get_many(self, ids: Sequence[str], replicate: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Like ``get`` for a batch, in ``ids`` order."""
        return [self.get(i, replicate) for i in ids]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
            os.close(self._fd)
        self._file, self._fd, self._pid, self._reps, self._checksums = None, None, None, [], {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_file=None, _fd=None, _pid=None, _reps=[], _checksums={})
        return state

    def __enter__(self) -> "EmbeddingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_MASK_BLOCK_ROWS = 2**22  # rows of a mask read at once by check_store_ids (bools: 4 MiB)


def check_store_ids(store: "EmbeddingReader | str | os.PathLike", proteins: Sequence, *, masks: bool = True) -> None:
    """Refuse embeddings whose ids do not name their own rows, in one line naming the file and the
    first wrong protein.

    The store (one shard of :func:`plan_shards` with ``shard_index``, or the whole split) must
    match ``split_fingerprint``, hold exactly the split's proteins, and at each position have
    residues + 2 rows and (``masks``) the random masks drawn from that id
    (:func:`ptm_mamba.masking.replicate_mask`), so swapped ids or rows are caught; the
    fingerprint hashes the split file, not the store. Misses a swap of two same-length proteins
    whose masks agree (always so with ``training.mask_prob`` 0). Cost: ~5 s for 100k proteins.
    """
    from .split import split_fingerprint

    reader = store if isinstance(store, EmbeddingReader) else EmbeddingReader(store)
    try:
        ids, _, offsets, attrs = reader._metadata()
        where, proteins, split = str(reader.path), list(proteins), attrs.get("split")
        recorded, fingerprint = attrs.get("split_fingerprint"), split_fingerprint(proteins)
        if recorded != fingerprint:
            raise PipelineError(f"{where}: made for another {split} split than the one given (split_fingerprint "
                                f"{recorded!r}, the split's {fingerprint!r}); the embeddings are stale, rerun the "
                                "embed stage")
        what, expected = f"the {split} split", proteins
        num_shards, index = attrs.get("num_shards"), attrs.get("shard_index")
        if index is not None:
            if not (isinstance(num_shards, int) and isinstance(index, int) and 0 <= index < num_shards):
                raise PipelineError(f"{where}: shard_index {index!r} of num_shards {num_shards!r} is not a shard")
            what, expected = f"shard {index} of {num_shards} of the {split} split", \
                plan_shards(proteins, num_shards)[index]
        length = {p.id: p.length for p in expected}
        stray = next((i for i, x in enumerate(ids) if x not in length), None)
        if stray is not None:
            raise PipelineError(f"{where}: position {stray} holds {ids[stray]!r}, not a protein of {what} (ids of "
                                "another split or shard, or edited); rerun the embed stage")
        if len(ids) != len(length):  # ids are unique (checked on opening), so some are missing
            missing = [p.id for p in expected if p.id not in set(ids)]
            raise PipelineError(f"{where}: {len(missing)} proteins of {what} missing (e.g. {missing[0]!r}); "
                                "rerun the embed stage")
        rows = np.diff(offsets)
        want = np.array([rows_of(length[x]) for x in ids], dtype=np.int64)
        bad = np.flatnonzero(rows != want)
        if bad.size:
            i = int(bad[0])
            raise PipelineError(f"{where}: position {i} ({ids[i]!r}) has {rows[i]} rows of embeddings, but "
                                f"{ids[i]!r} has {length[ids[i]]} residues (+ <cls>, <eos>): the rows of another "
                                "protein (ids reordered or swapped?) or stale embeddings; rerun the embed stage")
        if masks:
            _check_masks(reader, ids, offsets, attrs, where)
    finally:
        if reader is not store:
            reader.close()


def _check_masks(reader: EmbeddingReader, ids: list[str], offsets: np.ndarray, attrs: dict, where: str) -> None:
    """Every protein's stored masks, replicate by replicate, against the ones drawn for its id."""
    from .masking import replicate_mask

    mask_prob = attrs.get("mask_prob")
    if not isinstance(mask_prob, (int, float)) or not 0 < mask_prob < 1:
        return  # all False or all True: nothing tells one protein's masks from another's
    for k in range(int(attrs["mask_replicates"])):
        dset = reader._datasets(k)[1]
        i = 0
        while i < len(ids):
            j = i + 1  # proteins i..j-1 in one read
            while j < len(ids) and offsets[j + 1] - offsets[i] <= _MASK_BLOCK_ROWS:
                j += 1
            a, b = int(offsets[i]), int(offsets[j])
            try:
                block = dset[a:b]
            except OSError as e:
                raise _damaged(f"{where}: masks/{k} of proteins {ids[i]!r}..{ids[j - 1]!r}", e) from None
            for r in range(i, j):
                stored = block[int(offsets[r]) - a:int(offsets[r + 1]) - a]
                residues = len(stored) - rows_of(0)
                if residues < 0 or stored[0] or stored[-1] or not np.array_equal(
                        stored[residue_rows(residues)], replicate_mask(ids[r], k, residues, mask_prob)):
                    raise PipelineError(f"{where}: position {r} ({ids[r]!r}) replicate {k}: the stored mask is not "
                                        f"the one the embed stage draws for {ids[r]!r}: the rows of another protein "
                                        "(ids reordered or swapped?); rerun the embed stage")
            i = j
