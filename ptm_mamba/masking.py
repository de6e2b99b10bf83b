"""Masked-token prediction: which positions are hidden, as the original PTM-Mamba does.

The original masker hides, per batch, a random ``mask_prob`` (15%) of the
residues; with probability ``random_mask_only_prob`` (0.2) that is all,
otherwise every PTM token is hidden as well. Special tokens and padding are
never hidden, nor is ``<unk>`` (an unknown PTM: nothing to predict). ESM-2,
which knows no PTMs, always sees ``<mask>`` at PTM and ``<unk>`` positions and
at every randomly hidden position. Which position is which is defined once, in
:mod:`ptm_mamba.tokenizer` (``is_target``, ``is_ptm``, ``esm_hidden``, ``in_sequence``).

Randomness here is a pure function of its seeds (no global RNG state), so a
training run resumed at step ``s`` draws exactly what the uninterrupted run
drew, and the embed stage can precompute the random part of the mask:
:func:`replicate_mask` gives replicate ``k`` of protein ``id`` - the stored
mask the training stage uses in epoch ``e`` with ``k = e mod K``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .tokenizer import esm_hidden, in_sequence, is_ptm, is_target


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, the same on every machine and run."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def replicate_mask(protein_id: str, replicate: int, length: int, mask_prob: float) -> np.ndarray:
    """Replicate ``replicate`` of the random residue mask of a protein: (length,) bool.

    Each residue is hidden independently with probability ``mask_prob`` (the
    training masker's rule), seeded by the protein id and the replicate.
    """
    rng = np.random.default_rng(stable_seed("mask", protein_id, replicate))
    return rng.random(length) < mask_prob


def random_only(generator: torch.Generator, random_mask_only_prob: float) -> bool:
    """Draw whether a batch is masked at random only (else random + every PTM)."""
    return bool(torch.rand((), generator=generator) < random_mask_only_prob)


def prediction_mask(random_mask: torch.Tensor, ids: torch.Tensor, random_only: bool | torch.Tensor
                    ) -> torch.Tensor:
    """Positions the model must predict: (B, L) bool.

    ``random_mask``: the random part (B, L); ``ids``: the true tokens (B, L); ``random_only``:
    one draw for the batch, or (B,) bool, one per protein. Only targets (residue letters and
    known PTMs) are predicted: the random ones, and every known PTM where not ``random_only``.
    """
    only = torch.as_tensor(random_only, dtype=torch.bool, device=ids.device).reshape(-1, 1)
    return (random_mask & is_target(ids)) | (is_ptm(ids) & ~only)


def esm_mask(random_mask: torch.Tensor | np.ndarray, ids: torch.Tensor | np.ndarray):
    """Positions ESM-2 sees as ``<mask>``: every PTM and ``<unk>``, and every randomly hidden
    position of the protein (never ``<cls>``/``<eos>``/padding)."""
    return esm_hidden(ids) | (random_mask & in_sequence(ids))
