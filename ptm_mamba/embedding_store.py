"""HDF5 storage of precomputed ESM-2 embeddings: shard writer, validation, gather, reader.

Per protein of L residues and mask replicate k, the embed stage stores ESM-2 features of the
masked input ``<cls> residues <eos>`` (L+2 rows) plus the bool random mask used (False at
``<cls>``/``<eos>``). One job writes one shard; ``gather`` copies a split's shards into one
self-contained file that plain h5py reads. ``ptm-mamba predict`` writes the same layout. The
store takes any rows per protein; the count is checked where read (``BatchBuilder``).

Layout (a shard and a gathered file look the same to a reader)::

    ids              (n,)            variable-length UTF-8 strings
    offsets          (n+1,) int64    rows of protein i are offsets[i]:offsets[i+1]
    embeddings/<k>   (R, dim) float16, chunked, resizable along axis 0
    masks/<k>        (R,) bool
    attrs            split, split_fingerprint, dim, dtype, mask_replicates, format_version,
                     [shard_index, num_shards | num_shards], complete; the embed stage's
                     also settings, esm_model, repr_layer, mask_prob, mask_seed

``complete`` is set last, before the atomic rename. format_version 1 (no ``<cls>``/``<eos>``
rows) is refused. Staleness is the ``settings`` attribute alone (:func:`check_store_settings`).

Every array but ``ids`` (HDF5 cannot filter variable-length strings) has Fletcher32 checksums
per chunk, so flipped bits on disk fail the read (a one-line PipelineError naming the file)
instead of returning wrong numbers. Files without checksums still read, unchecked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple, Sequence

import h5py
import numpy as np

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
    ):
        if dim < 1 or replicates < 1:
            raise ValueError(f"dim and replicates must be >= 1, got dim={dim} replicates={replicates}")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise PipelineError(f"{path}: shard attributes missing: {', '.join(missing)}")
        fixed = {"dim": dim, "mask_replicates": replicates, "dtype": "float16", "format_version": FORMAT_VERSION}
        for k, v in fixed.items():
            if k in attrs and attrs[k] != v:
                raise PipelineError(f"{path}: attribute {k}={attrs[k]!r} contradicts the writer's {v!r}")
        self.path = Path(path)
        self.dim, self.replicates = dim, replicates
        self.attrs = {**{k: _attr_value(v) for k, v in attrs.items()}, **fixed}  # numpy scalars -> Python
        self.buffer_rows = buffer_rows or max(1, _BUFFER_BYTES // (2 * dim * replicates))
        self.chunk_rows = chunk_rows or _chunk_rows(dim)
        self.compression = compression
        self._out: _AtomicH5 | None = None

    def __enter__(self) -> "ShardWriter":
        self._out = out = _AtomicH5(self.path)
        try:
            f = out.file
            self._emb = [
                f.create_dataset(
                    f"embeddings/{k}", shape=(0, self.dim), maxshape=(None, self.dim), dtype=np.float16,
                    chunks=(self.chunk_rows, self.dim), compression=self.compression, fletcher32=True,
                )
                for k in range(self.replicates)
            ]
            self._mask = [
                f.create_dataset(f"masks/{k}", shape=(0,), maxshape=(None,), dtype=bool, chunks=(_MASK_CHUNK,),
                                 fletcher32=True)
                for k in range(self.replicates)
            ]
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
        self._buf_feat: list[list[np.ndarray]] = [[] for _ in range(self.replicates)]
        self._buf_mask: list[list[np.ndarray]] = [[] for _ in range(self.replicates)]
        self.buffered_rows = 0
        return self

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
        if name.split("/")[0] in ("ids", "offsets", "embeddings", "masks"):
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
            feats = [np.asarray(x, dtype=np.float16) for x in features]
        msks = [np.asarray(m) for m in masks]
        L = feats[0].shape[0] if feats[0].ndim == 2 else -1
        for k, (x, m) in enumerate(zip(feats, msks)):
            if x.shape != (L, self.dim) or m.shape != (L,):
                raise PipelineError(
                    f"{where} replicate {k}: features {x.shape} / mask {m.shape}, expected ({L}, {self.dim}) / ({L},)"
                )
            if m.dtype != np.bool_:
                raise PipelineError(f"{where} replicate {k}: mask dtype {m.dtype}, expected bool")
            if not np.isfinite(x).all():
                raise PipelineError(f"{where} replicate {k}: features contain NaN/Inf (after float16 cast)")
        for k in range(self.replicates):
            self._buf_feat[k].append(feats[k])
            self._buf_mask[k].append(msks[k])
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
                self._buf_feat[k].clear()
                self._buf_mask[k].clear()
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
    dim, K = attrs["dim"], attrs["mask_replicates"]
    names = ["ids", "offsets"] + [f"{g}/{k}" for g in ("embeddings", "masks") for k in range(K)]
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
        if emb.shape != (rows, dim) or emb.dtype != np.float16:
            raise PipelineError(f"{where}: embeddings/{k} is {emb.dtype}{emb.shape}, expected float16({rows}, {dim})")
        if mask.shape != (rows,):
            raise PipelineError(f"{where}: masks/{k} has shape {mask.shape}, expected ({rows},)")
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
    """First row of float16 ``block`` with NaN/Inf, or None; bit ops are ~10x faster than ``np.isfinite``."""
    bits = block.reshape(-1).view(np.uint16)
    width = max(1, int(np.prod(block.shape[1:])))
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
        if check_values and block.dtype == np.float16:
            row = _first_nonfinite_row(block)
            if row is not None:
                raise PipelineError(f"{path}: {name} has NaN/Inf at row {start + row}")
        yield block


def _store_datasets(K: int) -> list[str]:
    return [f"{g}/{k}" for k in range(K) for g in ("embeddings", "masks")]


def _check_values(f: h5py.File, K: int, path: Path) -> None:
    """Read every array block by block (verifying checksums); refuse NaN/Inf features."""
    for name in _store_datasets(K):
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
                _check_values(f, attrs["mask_replicates"], path)
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
    names = _store_datasets(ref.attrs["mask_replicates"])

    out = _AtomicH5(out_path)
    try:
        f = out.file
        out.kept += [f.create_dataset("ids", data=np.array(all_ids, dtype=object), dtype=h5py.string_dtype("utf-8")),
                     f.create_dataset("offsets", data=offsets.astype(np.int64), fletcher32=True)]
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


class EmbeddingReader:
    """Reads one protein's (or a batch's) embeddings of one replicate from a shard or gathered file.

    The handle is reopened when ``os.getpid()`` changes: HDF5 handles must not cross a fork.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._meta: tuple[list[str], dict[str, int], np.ndarray, dict[str, Any]] | None = None

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # Drop the parent's handle and datasets, so HDF5 does not hand back its file id.
            self._file, self._emb, self._mask = None, [], []
            f = _open(self.path)
            try:
                if self._meta is None:
                    ids, offsets, attrs = _check_layout(f, str(self.path))
                    self._meta = (ids, {i: n for n, i in enumerate(ids)}, offsets, attrs)
            except OSError as e:  # ids/offsets unreadable
                f.close()
                raise _damaged(str(self.path), e) from None
            except BaseException:
                f.close()
                raise
            K = self._meta[3]["mask_replicates"]
            self._emb = [f[f"embeddings/{k}"] for k in range(K)]
            self._mask = [f[f"masks/{k}"] for k in range(K)]
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

    def _datasets(self, replicate: int) -> tuple[h5py.Dataset, h5py.Dataset]:
        self._h5()
        K = len(self._emb)
        if not 0 <= replicate < K:
            raise PipelineError(f"{self.path}: replicate {replicate} out of range 0..{K - 1}")
        return self._emb[replicate], self._mask[replicate]

    def _read(self, replicate: int, a: int, b: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Rows a:b of one replicate; a failed checksum or truncated file becomes a PipelineError."""
        emb, mask = self._datasets(replicate)
        try:
            return emb[a:b], mask[a:b]
        except OSError as e:
            raise _damaged(f"{self.path}: {what} replicate {replicate}", e) from None

    def get(self, id: str, replicate: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (rows, dim) float16 and mask (rows,) bool of protein ``id``, one replicate."""
        offsets = self._metadata()[2]
        i = self.index(id)
        return self._read(replicate, int(offsets[i]), int(offsets[i + 1]), f"protein {id!r}")

    def get_many(self, ids: Sequence[str], replicate: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Like ``get`` for a batch, in ``ids`` order; proteins adjacent in the file are read in one go."""
        ids_all, _, offsets, _ = self._metadata()
        rows = sorted({self.index(i) for i in ids})
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        j = 0
        while j < len(rows):  # runs of consecutive proteins -> one contiguous read each
            end = j
            while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
                end += 1
            a, b = int(offsets[rows[j]]), int(offsets[rows[end] + 1])
            try:
                x, m = self._read(replicate, a, b, f"proteins {ids_all[rows[j]]!r}..{ids_all[rows[end]]!r}")
            except PipelineError:
                for r in rows[j:end + 1]:  # name the damaged protein
                    self.get(ids_all[r], replicate)
                raise
            for r in rows[j:end + 1]:
                s, e = int(offsets[r]) - a, int(offsets[r + 1]) - a
                out[r] = (x[s:e], m[s:e])
            j = end + 1
        return [out[self.index(i)] for i in ids]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid, self._emb, self._mask = None, None, [], []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_file=None, _pid=None)
        state.pop("_emb", None)
        state.pop("_mask", None)
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
