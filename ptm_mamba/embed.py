"""The embed stage: ESM-2 features of every split, sharded, with mask replicates.

ESM-2 reads each protein with ``<mask>`` at every PTM and ``<unk>`` position and at
:func:`replicate_mask`'s; training in epoch e uses replicate e mod K, so no residue the model must
predict is visible through its ESM features. Layout: :mod:`ptm_mamba.embedding_store`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .dataset import Protein
from .embedding_store import (SETTINGS_ATTR, ShardWriter, check_store_ids, check_store_settings, gather,
                              plan_shards, validate_shard)
from .errors import PipelineError
from .fileio import leftover_temp_files
from .layout import SPLITS, shard_path, split_csv, split_store_path
from .masking import esm_mask, replicate_mask
from .settings import EmbeddingSettings, Settings
from .split import load_split_dir, split_fingerprint
from .stages import EMBED, stage_settings
from .tokenizer import PTMTokenizer, residue_rows, rows_of, token_ids

log = logging.getLogger(__name__)
MASK_SEED = 0  # replicate masks are seeded by (protein id, replicate) alone

__all__ = ["embed_all", "embed_proteins", "embed_shard", "esm_inputs", "gather_split", "split_proteins_of",
           "store_attrs", "stored_mask"]


def store_attrs(settings: Settings, esm_name: str, repr_layer: int, split: str, proteins: list[Protein]) -> dict:
    """The attributes of a split's stored embeddings: what they are of, and the settings record
    (:data:`~ptm_mamba.embedding_store.SETTINGS_ATTR`) that says whether they are stale."""
    return {
        "esm_model": esm_name,
        "repr_layer": int(repr_layer),
        "split": split,
        "split_fingerprint": split_fingerprint(proteins),
        "mask_replicates": int(settings.embedding.mask_replicates),
        "mask_prob": float(settings.training.mask_prob),
        "mask_seed": MASK_SEED,
        SETTINGS_ATTR: json.dumps(stage_settings(settings, EMBED), sort_keys=True),
    }


def split_proteins_of(settings: Settings, split: str, split_file: str | os.PathLike) -> list[Protein]:
    """One split's proteins, read from the split stage's folder after its checks."""
    split_file = Path(split_file)
    expected = split_csv(split_file.parent, split).name
    if split_file.name != expected:
        raise PipelineError(f"{split_file}: the {split} split must be the split stage's {expected}")
    return load_split_dir(split_file.parent, settings)[split]


def esm_inputs(proteins: list[Protein], replicates: int, mask_prob: float, tokenizer: PTMTokenizer
               ) -> Iterator[tuple[tuple[str, int], str, np.ndarray, np.ndarray]]:
    """``((id, k), residues, esm_mask, random_mask)`` per protein and replicate; masks (L,) bool."""
    for p in proteins:
        residues = tokenizer.residue_sequence(list(p.tokens))
        ids = token_ids(p.tokens)
        for k in range(replicates):
            random_mask = replicate_mask(p.id, k, p.length, mask_prob)
            yield (p.id, k), residues, esm_mask(random_mask, ids), random_mask


def stored_mask(random_mask: np.ndarray) -> np.ndarray:
    """A residue mask (L,) as stored beside the features' rows: False at <cls> and <eos>."""
    rows = np.zeros(rows_of(len(random_mask)), dtype=bool)
    rows[residue_rows(len(random_mask))] = random_mask
    return rows


def embed_proteins(settings: Settings, esm_model, proteins: list[Protein], output: str | os.PathLike,
                   attrs: dict, progress: bool = True) -> None:
    """Embed ``proteins`` (every replicate) into one shard file, written atomically."""
    from .esm import embed

    emb: EmbeddingSettings = settings.embedding
    replicates = emb.mask_replicates
    inputs = list(esm_inputs(proteins, replicates, settings.training.mask_prob, PTMTokenizer()))
    random_masks = {key: stored_mask(random_mask) for key, _, _, random_mask in inputs}
    pending: dict[str, dict[int, np.ndarray]] = {}
    with ShardWriter(output, dim=esm_model.embed_dim, replicates=replicates, attrs=attrs, dtype=emb.dtype) as writer:
        for (pid, k), features in embed(esm_model, [item[:3] for item in inputs],
                                        max_tokens_per_batch=emb.max_tokens_per_batch, batch_size=emb.batch_size,
                                        window=emb.window, overlap=emb.overlap, progress=progress):
            got = pending.setdefault(pid, {})
            got[k] = features
            if len(got) == replicates:  # all replicates of a protein are in: write it
                del pending[pid]
                writer.add(pid, [got[r] for r in range(replicates)],
                           [random_masks[(pid, r)] for r in range(replicates)])
    if pending:
        raise RuntimeError(f"embedding ended with proteins missing replicates: {sorted(pending)[:3]}")


def embed_shard(settings: Settings, split: str, index: int, num_shards: int, split_file: str | os.PathLike,
                output: str | os.PathLike, esm_model=None, progress: bool = True) -> int:
    """Embed shard ``index`` of ``num_shards`` of one split file; returns its protein count."""
    from .esm import load_esm_of

    if not 0 <= index < num_shards:
        raise PipelineError(f"shard index {index} is outside 0..{num_shards - 1}")
    proteins = split_proteins_of(settings, split, split_file)
    output = Path(output)
    for stale in leftover_temp_files(output):  # left by a killed earlier try of this job
        stale.unlink()
    esm_model = esm_model or load_esm_of(settings)
    part = plan_shards(proteins, num_shards)[index]
    attrs = store_attrs(settings, esm_model.name, esm_model.repr_layer, split, proteins)
    attrs.update(shard_index=index, num_shards=num_shards)
    embed_proteins(settings, esm_model, part, output, attrs, progress=progress)
    return len(part)


def gather_split(settings: Settings, split: str, split_file: str | os.PathLike, shard_files: list[str],
                 output: str | os.PathLike) -> None:
    """Check a split's shards against its split file and settings, then copy them into one file."""
    proteins = split_proteins_of(settings, split, split_file)
    for stale in leftover_temp_files(output):  # left by a killed earlier try of this job (a split's size)
        stale.unlink()
    for shard in shard_files:
        check_store_settings(shard, settings)
        check_store_ids(shard, proteins)  # its part of the split, each id on its own protein's rows
    gather(shard_files, output, expected_ids=[p.id for p in proteins])


def embed_all(settings: Settings, split_dir: str | os.PathLike, output_dir: str | os.PathLike,
              batch_size: int | None = None, rank: int = 0, world_size: int = 1,
              barrier=lambda: None) -> None:
    """The original pipeline's one-command embedding: every shard of every split, then gather.

    Under several processes, process r embeds shards r, r+N, ...; rank 0 gathers
    after a barrier. Finished shards (complete files) are not recomputed.
    """
    if batch_size is not None:
        settings = settings.replace(embedding=dataclasses.replace(settings.embedding, batch_size=batch_size))
    num_shards = settings.embedding.shards
    esm_model = None
    jobs = [(split, i) for split in SPLITS for i in range(num_shards)]
    for n, (split, i) in enumerate(jobs):
        if n % world_size != rank:
            continue
        out = shard_path(output_dir, split, i, num_shards)
        split_file = split_csv(split_dir, split)
        if out.exists():
            try:
                proteins = split_proteins_of(settings, split, split_file)
                validate_shard(out, expected_ids=[p.id for p in plan_shards(proteins, num_shards)[i]],
                               expected_attrs={})
                check_store_settings(out, settings)
                check_store_ids(out, proteins)  # a shard whose ids were swapped is recomputed, not kept
                log.info("shard %s is complete, skipping", out)
                continue
            except PipelineError as err:
                log.info("recomputing %s: %s", out, err)
        if esm_model is None:
            from .esm import load_esm_of

            esm_model = load_esm_of(settings)
        embed_shard(settings, split, i, num_shards, split_file, out, esm_model=esm_model)
    barrier()
    if rank == 0:
        for split in SPLITS:
            gather_split(settings, split, split_csv(split_dir, split),
                         [str(shard_path(output_dir, split, i, num_shards)) for i in range(num_shards)],
                         split_store_path(output_dir, split))
