"""Masked-token prediction: which positions are hidden, as the original PTM-Mamba does.

The original masker hides, per batch, a random ``mask_prob`` (15%) of the
residues; with probability ``random_mask_only_prob`` (0.2) that is all,
otherwise every PTM token is hidden as well. Special tokens and padding are
never hidden. ESM-2, which knows no PTMs, always sees ``<mask>`` at PTM
positions and at every hidden position.

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


def prediction_mask(random_mask: torch.Tensor, is_ptm: torch.Tensor, residue: torch.Tensor,
                    random_only_batch: bool) -> torch.Tensor:
    """Positions the model must predict: (B, L) bool.

    ``random_mask``: the random part (B, L); ``is_ptm``: PTM tokens (B, L);
    ``residue``: real residues, i.e. not special and not padding (B, L).
    """
    mask = random_mask & residue
    if not random_only_batch:
        mask = mask | (is_ptm & residue)
    return mask


def esm_mask(random_mask: torch.Tensor | np.ndarray, is_ptm: torch.Tensor | np.ndarray):
    """Positions ESM-2 sees as ``<mask>``: every PTM and every randomly hidden residue."""
    return random_mask | is_ptm
