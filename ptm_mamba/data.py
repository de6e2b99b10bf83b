"""Training batches: tokens, the masks to predict, and the ESM-2 features that go with them.

A protein enters the model as ``<cls> tokens <eos>``, right-padded; only padding gets zero
features. A protein over ``dataset.max_sequence_length`` is cropped to a random window, as in the
original; precomputed features are of the whole protein, so a cropped one gets its window's rows
between the whole protein's ``<cls>`` and ``<eos>`` rows.

The random mask: with precomputed features, the stored replicate (epoch mod K), so the features
hid exactly those residues; else drawn per batch; in evaluation, replicate 0, so every validation
pass asks the same questions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .dataset import Protein
from .embedding_store import EmbeddingReader
from .errors import PipelineError
from .masking import esm_mask, prediction_mask, random_only, replicate_mask, stable_seed
from .tokenizer import ROWS_AROUND_RESIDUES, PTMTokenizer, residue_rows, rows_of, token_ids


@dataclass
class Batch:
    input_ids: torch.Tensor        # (B, T) long, masked positions = <mask>
    labels: torch.Tensor           # (B, T) long, the true tokens
    pred_mask: torch.Tensor        # (B, T) bool, positions scored by the loss
    lengths: torch.Tensor          # (B,) long, tokens incl. <cls>/<eos>
    esm_features: torch.Tensor | None  # (B, T, dim) as stored: float16, or int8 (zeros at padding), precomputed
    esm_tokens: torch.Tensor | None    # (B, T) long ESM-2 input, on-the-fly mode
    esm_scales: torch.Tensor | None = None  # (B, T) float32 per-row scales of int8 features (dequantised on the device)

    def _map(self, fn) -> "Batch":
        return Batch(*(None if t is None else fn(t) for t in (getattr(self, f) for f in self.__dataclass_fields__)))

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        return self._map(torch.Tensor.pin_memory)


def _use_count(t: torch.Tensor) -> int | None:
    """How many tensors (views included) hold ``t``'s storage; None where torch does not say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(t.untyped_storage()._cdata)


def _idle(buf: torch.Tensor, idle_count: int | None) -> bool:
    return idle_count is not None and _use_count(buf) == idle_count


class _BufferPool:
    """Batch buffers that are reused instead of allocated (and page-faulted) per batch.

    A buffer is handed out again only once no tensor but the pool's holds its storage, so a batch
    still in use (kept by a test, or by the DataLoader's pinning thread) is never written over. In
    a DataLoader worker nothing is reused: a batch sent to the main process shares its storage.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self.free: list[tuple[torch.Tensor, int | None]] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = int(np.prod(shape))
        if torch.utils.data.get_worker_info() is not None:  # in shared memory: sent without a copy
            storage = torch.UntypedStorage._new_shared(n * dtype.itemsize)
            return torch.empty(0, dtype=dtype).set_(storage).view(shape)
        for buf, idle in self.free:
            if buf.dtype == dtype and buf.numel() >= n and _idle(buf, idle):
                return buf[:n].view(shape)
        buf = torch.empty(n, dtype=dtype)
        # keep the buffers in use (free again later) and the new one; an idle one was too small
        self.free = [(b, idle) for b, idle in self.free if not _idle(b, idle)][-(self.size - 1):] + \
            [(buf, _use_count(buf))]
        return buf[:n].view(shape)

    def __getstate__(self) -> dict:
        return {"size": self.size, "free": []}


class BatchBuilder:
    """Builds :class:`Batch` es of one split. Picklable: DataLoader workers open the HDF5 themselves."""

    def __init__(self, proteins: list[Protein], *, max_sequence_length: int, mask_prob: float,
                 random_mask_only_prob: float, store: EmbeddingReader | None = None,
                 esm_alphabet=None):
        tok = PTMTokenizer()
        self.tokenizer = tok
        self.proteins = proteins
        self.ids = [p.id for p in proteins]
        self.tokens = [token_ids(p.tokens) for p in proteins]
        self.lengths = [min(rows_of(len(t)), max_sequence_length) for t in self.tokens]
        self.max_residues = max_sequence_length - ROWS_AROUND_RESIDUES
        self.mask_prob, self.random_mask_only_prob = mask_prob, random_mask_only_prob
        self.store = store
        self.esm_alphabet = esm_alphabet
        self._features, self._scales = _BufferPool(), _BufferPool()
        if esm_alphabet is not None:
            from .esm import esm_token_ids

            self.esm_ids = [esm_token_ids(esm_alphabet, tok.residue_sequence(list(p.tokens)), key=p.id)
                            for p in proteins]
        if store is not None:
            missing = set(self.ids) - set(store.ids)
            if missing:
                raise PipelineError(f"{store.path}: no embeddings for {len(missing)} proteins of this split "
                                    f"(e.g. {sorted(missing)[0]!r}); rerun the embed stage")
            rows, residues = store.row_counts(self.ids), np.array([len(t) for t in self.tokens], dtype=np.int64)
            bad = np.flatnonzero(rows != rows_of(residues))
            if bad.size:
                i = bad[0]
                raise PipelineError(f"{store.path}: protein {self.ids[i]!r} has {rows[i]} rows of embeddings, "
                                    f"expected {rows_of(residues[i])} (<cls>, {residues[i]} residues, <eos>) "
                                    "(stale or foreign embeddings; rerun the embed stage)")

    def __len__(self) -> int:
        return len(self.proteins)

    def build(self, indices: list[int], *, replicate: int, generator: torch.Generator | None) -> Batch:
        """Batch of proteins ``indices``. ``generator`` None means evaluation (deterministic)."""
        train = generator is not None
        tok = self.tokenizer
        B, T = len(indices), rows_of(max(min(len(self.tokens[i]), self.max_residues) for i in indices))
        feats = scales = None
        if self.store is not None:  # read straight into the batch's buffers; only padding is zeroed
            int8 = self.store.dtype == "int8"
            feats = self._features.take((B, T, self.store.attrs["dim"]), torch.int8 if int8 else torch.float16)
            scales = self._scales.take((B, T), torch.float32) if int8 else None
            # filled through numpy: torch's fill and copy of these sizes wake its thread pool, whose
            # waiting costs more CPU than the bytes (measured: 5x the loader's CPU time)
            feats_np, scales_np = feats.numpy(), None if scales is None else scales.numpy()
        rows = []
        for n, i in enumerate(indices):
            tokens, pid = self.tokens[i], self.ids[i]
            cropped = len(tokens) > self.max_residues
            if feats is not None:
                stored = self.store.read(pid, replicate, out=None if cropped else feats_np[n, :rows_of(len(tokens))])
                rmask = stored.mask[residue_rows(len(tokens))]  # <cls>/<eos> are never hidden
            else:
                rmask = (torch.rand(len(tokens), generator=generator).numpy() < self.mask_prob) if train \
                    else replicate_mask(pid, 0, len(tokens), self.mask_prob)
            start = 0
            if cropped:
                span = len(tokens) - self.max_residues + 1
                start = int(torch.randint(span, (), generator=generator)) if train \
                    else stable_seed("crop", pid) % span
            window = slice(start, start + self.max_residues)
            if feats is not None:
                used = rows_of(len(tokens[window]))
                if cropped:
                    feats_np[n, :used] = crop_rows(stored.features, window)
                feats_np[n, used:] = 0
                if scales is not None:
                    scales_np[n, :used] = crop_rows(stored.scales, window)
                    scales_np[n, used:] = 0
            esm_ids = self.esm_ids[i][window] if self.esm_alphabet is not None else None
            rows.append((tokens[window], rmask[window], esm_ids, pid))

        labels = torch.full((B, T), tok.pad_id, dtype=torch.long)
        rand = torch.zeros((B, T), dtype=torch.bool)
        esm_tokens = torch.full((B, T), self.esm_alphabet.padding_idx, dtype=torch.long) \
            if self.esm_alphabet is not None else None
        for b, (tokens, rmask, esm_ids, _) in enumerate(rows):
            L, residues = len(tokens), residue_rows(len(tokens))
            labels[b, 0], labels[b, L + 1] = tok.cls_id, tok.eos_id
            labels[b, residues] = torch.from_numpy(tokens)
            rand[b, residues] = torch.from_numpy(np.asarray(rmask, dtype=bool))
            if esm_ids is not None:
                esm_tokens[b, 0], esm_tokens[b, L + 1] = self.esm_alphabet.cls_idx, self.esm_alphabet.eos_idx
                esm_tokens[b, residues] = torch.from_numpy(esm_ids.astype(np.int64))
        if train:
            pred = prediction_mask(rand, labels, random_only(generator, self.random_mask_only_prob))
        else:  # per protein, a stable draw of the same two modes
            only = torch.tensor([stable_seed("mode", r[3]) / 2**63 < self.random_mask_only_prob for r in rows])
            pred = prediction_mask(rand, labels, only)
        if esm_tokens is not None:  # ESM sees <mask> at every PTM, <unk> and randomly hidden residue
            esm_tokens[esm_mask(rand, labels)] = self.esm_alphabet.mask_idx
        input_ids = labels.masked_fill(pred, tok.mask_id)
        lengths = torch.tensor([rows_of(len(r[0])) for r in rows], dtype=torch.long)
        return Batch(input_ids, labels, pred, lengths, feats, esm_tokens, scales)


def crop_rows(rows: np.ndarray, window: slice) -> np.ndarray:
    """Stored rows (features or per-row values) of a protein cropped to ``window`` (see the module docstring)."""
    length = len(rows) - ROWS_AROUND_RESIDUES
    start, stop, _ = window.indices(length)
    if (start, stop) == (0, length):
        return rows  # not cropped: no copy
    residues = rows[residue_rows(length)]
    return np.concatenate([rows[:1], residues[start:stop], rows[-1:]])


class EpochBatches(torch.utils.data.Dataset):
    """One process's batches of one epoch, from ``start`` on; item j is a whole :class:`Batch`.

    Seeded per (seed, epoch, batch), so a run resumed mid-epoch draws what the first drew.
    """

    def __init__(self, builder: BatchBuilder, batches: list[list[int]], *, seed: int, epoch: int,
                 replicate: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.builder, self.seed, self.epoch, self.replicate = builder, seed, epoch, replicate
        self.numbers = list(range(rank, len(batches), world_size))[start:]
        self.batches = batches

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, j: int) -> Batch:
        number = self.numbers[j]
        gen = torch.Generator().manual_seed(stable_seed("step", self.seed, self.epoch, number))
        return self.builder.build(self.batches[number], replicate=self.replicate, generator=gen)


class EvalBatches(torch.utils.data.Dataset):
    """One process's share of an evaluation split: fixed batches, deterministic masks."""

    def __init__(self, builder: BatchBuilder, batches: list[list[int]], rank: int = 0, world_size: int = 1):
        self.builder = builder
        self.batches = batches[rank::world_size]
        self.numbers = list(range(rank, len(batches), world_size))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> Batch:
        return self.builder.build(self.batches[j], replicate=0, generator=None)


def collate_single(batch: Batch) -> Batch:
    return batch
