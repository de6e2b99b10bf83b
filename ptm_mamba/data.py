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
    esm_features: torch.Tensor | None  # (B, T, dim) float16 as stored (zeros at padding), precomputed mode
    esm_tokens: torch.Tensor | None    # (B, T) long ESM-2 input, on-the-fly mode

    def _map(self, fn) -> "Batch":
        return Batch(*(None if t is None else fn(t) for t in (getattr(self, f) for f in self.__dataclass_fields__)))

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        return self._map(torch.Tensor.pin_memory)


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
        stored = self.store.get_many([self.ids[i] for i in indices], replicate) if self.store else None
        rows = []
        for n, i in enumerate(indices):
            tokens, pid = self.tokens[i], self.ids[i]
            feats, rmask = stored[n] if stored else (None, None)
            if feats is not None:
                if not np.isfinite(feats).all():  # damage the checksums cannot see
                    raise PipelineError(f"{self.store.path}: protein {pid!r} replicate {replicate} has NaN/Inf "
                                        "embeddings (rerun the embed stage)")
                rmask = rmask[residue_rows(len(tokens))]  # <cls>/<eos> are never hidden
            else:
                rmask = (torch.rand(len(tokens), generator=generator).numpy() < self.mask_prob) if train \
                    else replicate_mask(pid, 0, len(tokens), self.mask_prob)
            start = 0
            if len(tokens) > self.max_residues:
                span = len(tokens) - self.max_residues + 1
                start = int(torch.randint(span, (), generator=generator)) if train \
                    else stable_seed("crop", pid) % span
            window = slice(start, start + self.max_residues)
            esm_ids = self.esm_ids[i][window] if self.esm_alphabet is not None else None
            rows.append((tokens[window], rmask[window], None if feats is None else crop_rows(feats, window),
                         esm_ids, pid))

        B, T = len(rows), rows_of(max(len(r[0]) for r in rows))
        labels = torch.full((B, T), tok.pad_id, dtype=torch.long)
        rand = torch.zeros((B, T), dtype=torch.bool)
        # float16 as stored: half the bytes to assemble and copy; the model casts on the device
        feats = torch.zeros((B, T, self.store.attrs["dim"]), dtype=torch.float16) if self.store else None
        esm_tokens = torch.full((B, T), self.esm_alphabet.padding_idx, dtype=torch.long) \
            if self.esm_alphabet is not None else None
        for b, (tokens, rmask, f, esm_ids, _) in enumerate(rows):
            L, residues = len(tokens), residue_rows(len(tokens))
            labels[b, 0], labels[b, L + 1] = tok.cls_id, tok.eos_id
            labels[b, residues] = torch.from_numpy(tokens)
            rand[b, residues] = torch.from_numpy(np.asarray(rmask, dtype=bool))
            if f is not None:
                feats[b, :rows_of(L)] = torch.from_numpy(np.asarray(f, dtype=np.float16))
            if esm_ids is not None:
                esm_tokens[b, 0], esm_tokens[b, L + 1] = self.esm_alphabet.cls_idx, self.esm_alphabet.eos_idx
                esm_tokens[b, residues] = torch.from_numpy(esm_ids.astype(np.int64))
        if train:
            pred = prediction_mask(rand, labels, random_only(generator, self.random_mask_only_prob))
        else:  # per protein, a stable draw of the same two modes
            only = torch.tensor([stable_seed("mode", r[4]) / 2**63 < self.random_mask_only_prob for r in rows])
            pred = prediction_mask(rand, labels, only)
        if esm_tokens is not None:  # ESM sees <mask> at every PTM, <unk> and randomly hidden residue
            esm_tokens[esm_mask(rand, labels)] = self.esm_alphabet.mask_idx
        input_ids = labels.masked_fill(pred, tok.mask_id)
        lengths = torch.tensor([rows_of(len(r[0])) for r in rows], dtype=torch.long)
        return Batch(input_ids, labels, pred, lengths, feats, esm_tokens)


def crop_rows(rows: np.ndarray, window: slice) -> np.ndarray:
    """Stored rows of a protein cropped to ``window`` (see the module docstring)."""
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
