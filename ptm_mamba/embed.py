"""The embed stage: ESM-2 features of every split, sharded, with mask replicates.

Per protein and replicate k, ESM-2 reads ``<cls> residues <eos>`` with ``<mask>``
at every PTM (and ``<unk>``) position and at the positions of :func:`replicate_mask`
(the random part of the training mask); its output at every one of those L+2
positions and that mask (False at ``<cls>``/``<eos>``) are stored. Training in
epoch e uses replicate e mod K, so no residue the model must predict is visible
through its ESM features.

A split is cut into shards balanced by residues; each shard is an independent
job (``embed_shard``), and ``gather_split`` copies a split's shards into
``{embeddings_dir}/{split}_embeddings.h5``, a self-contained file (the workflow then
deletes the shards: they are temporary).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .dataset import Protein
from .embedding_store import EmbeddingReader, ShardWriter, check_store_ids, gather
from .errors import PipelineError
from .fileio import leftover_temp_files
from .layout import SPLITS, shard_path, split_store_path
from .masking import esm_mask, replicate_mask
from .split import load_split_dir, split_fingerprint
from .stages import EMBED, check_settings, stage_settings
from .tokenizer import PTMTokenizer, token_ids

log = logging.getLogger(__name__)
MASK_SEED = 0  # replicate masks are seeded by (protein id, replicate) alone


def plan_shards(proteins: list[Protein], num_shards: int) -> list[list[Protein]]:
    """Cut a split into ``num_shards`` parts of about equal residue counts.

    Longest first onto the lightest shard (ties by index), then each shard
    keeps the split's order. Deterministic; a shard may be empty only when
    there are fewer proteins than shards.
    """
    loads = [0] * num_shards
    members: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(proteins)), key=lambda i: (-proteins[i].length, i)):
        s = min(range(num_shards), key=lambda s: (loads[s], s))
        loads[s] += proteins[i].length
        members[s].append(i)
    return [[proteins[i] for i in sorted(m)] for m in members]


def store_attrs(config: dict, esm_name: str, repr_layer: int, split: str, proteins: list[Protein]) -> dict:
    """The attributes that make a stored embedding valid for this config and split."""
    return {
        "esm_model": esm_name,
        "repr_layer": int(repr_layer),
        "split": split,
        "split_fingerprint": split_fingerprint(proteins),
        "mask_replicates": int(config["embedding"]["mask_replicates"]),
        "mask_prob": float(config["training"]["mask_prob"]),
        "mask_seed": MASK_SEED,
        "settings": json.dumps(stage_settings(config, EMBED), sort_keys=True),
    }


def check_store_settings(path: str | os.PathLike, config: dict) -> None:
    """Refuse embeddings (a shard or a gathered file) made with other embed-stage settings than
    ``config``'s, e.g. another ESM-2 checkpoint or mask_prob (one line naming the key)."""
    with EmbeddingReader(path) as store:
        recorded = store.attrs.get("settings")
    try:
        recorded = json.loads(recorded) if isinstance(recorded, str) else None
    except ValueError:
        recorded = None
    check_settings(recorded, config, EMBED, str(path), "the embeddings are stale, rerun the embed stage")


def split_proteins_of(config: dict, split: str, split_file: str | os.PathLike) -> list[Protein]:
    """One split's proteins, read from the split stage's folder after its checks."""
    split_file = Path(split_file)
    if split_file.name != f"{split}.csv":
        raise PipelineError(f"{split_file}: the {split} split must be the split stage's {split}.csv")
    return load_split_dir(split_file.parent, config)[split]


def esm_inputs(proteins: list[Protein], replicates: int, mask_prob: float, tokenizer: PTMTokenizer
               ) -> Iterator[tuple[tuple[str, int], str, np.ndarray, np.ndarray]]:
    """``((id, k), residues, esm_mask, random_mask)`` for every protein and replicate k
    (masks over the residues, (L,) bool)."""
    for p in proteins:
        residues = tokenizer.residue_sequence(list(p.tokens))
        ids = token_ids(p.tokens)
        for k in range(replicates):
            random_mask = replicate_mask(p.id, k, p.length, mask_prob)
            yield (p.id, k), residues, esm_mask(random_mask, ids), random_mask


def stored_mask(random_mask: np.ndarray) -> np.ndarray:
    """A residue mask (L,) as stored beside the features' rows (L+2,): False at <cls> and <eos>."""
    return np.concatenate(([False], random_mask, [False]))


def embed_proteins(config: dict, esm_model, proteins: list[Protein], output: str | os.PathLike,
                   attrs: dict, progress: bool = True) -> None:
    """Embed ``proteins`` (every replicate) into one shard file, written atomically."""
    from .esm import embed

    emb = config["embedding"]
    replicates, mask_prob = emb["mask_replicates"], config["training"]["mask_prob"]
    inputs = list(esm_inputs(proteins, replicates, mask_prob, PTMTokenizer()))
    random_masks = {key: stored_mask(random_mask) for key, _, _, random_mask in inputs}
    pending: dict[str, dict[int, np.ndarray]] = {}
    with ShardWriter(output, dim=esm_model.embed_dim, replicates=replicates, attrs=attrs) as writer:
        for (pid, k), features in embed(esm_model, [item[:3] for item in inputs],
                                        max_tokens_per_batch=emb["max_tokens_per_batch"],
                                        batch_size=emb["batch_size"], window=emb["window"],
                                        overlap=emb["overlap"], progress=progress):
            got = pending.setdefault(pid, {})
            got[k] = features
            if len(got) == replicates:  # all replicates of a protein are in: write it
                del pending[pid]
                writer.add(pid, [got[r] for r in range(replicates)],
                           [random_masks[(pid, r)] for r in range(replicates)])
    if pending:
        raise RuntimeError(f"embedding ended with proteins missing replicates: {sorted(pending)[:3]}")


def _check_overlap(config: dict) -> None:
    emb = config["embedding"]
    if emb["overlap"] >= emb["window"]:
        raise PipelineError(f"embedding.overlap ({emb['overlap']}) must be smaller than "
                            f"embedding.window ({emb['window']})")


def load_esm_for(config: dict, device=None):
    """The config's ESM-2 on ``device`` (default: the embed stage's, :func:`ptm_mamba.device.choose_device`)."""
    from .device import choose_device, describe, summary
    from .esm import load_esm

    _check_overlap(config)
    if device is None:
        device = choose_device(config["device"], [], "embed")
        print(f"ESM-2 runs on {summary(describe(device))}", flush=True)  # stdout: stderr is for what went wrong
    return load_esm(config["esm"]["model"], config["esm"]["repr_layer"], device=device)


def embed_shard(config: dict, split: str, index: int, num_shards: int, split_file: str | os.PathLike,
                output: str | os.PathLike, esm_model=None, progress: bool = True) -> int:
    """Embed shard ``index`` of ``num_shards`` of one split file; returns its protein count."""
    if not 0 <= index < num_shards:
        raise PipelineError(f"shard index {index} is outside 0..{num_shards - 1}")
    proteins = split_proteins_of(config, split, split_file)
    output = Path(output)
    for stale in leftover_temp_files(output):  # left by a killed earlier try of this job
        stale.unlink()
    esm_model = esm_model or load_esm_for(config)
    part = plan_shards(proteins, num_shards)[index]
    attrs = store_attrs(config, esm_model.name, esm_model.repr_layer, split, proteins)
    attrs.update(shard_index=index, num_shards=num_shards)
    embed_proteins(config, esm_model, part, output, attrs, progress=progress)
    return len(part)


def gather_split(config: dict, split: str, split_file: str | os.PathLike, shard_files: list[str],
                 output: str | os.PathLike) -> None:
    """Validate a split's shards against its split file and config, then copy them into one file."""
    proteins = split_proteins_of(config, split, split_file)
    for stale in leftover_temp_files(output):  # left by a killed earlier try of this job (a split's size)
        stale.unlink()
    for shard in shard_files:
        check_store_settings(shard, config)
        check_store_ids(shard, proteins)  # its part of the split, each id on its own protein's rows
    from .esm import model_name

    attrs = store_attrs(config, model_name(config["esm"]["model"]), config["esm"]["repr_layer"] or 0,
                        split, proteins)
    if config["esm"]["repr_layer"] is None:
        del attrs["repr_layer"]  # "the last layer": whatever the shards agree on
    gather(shard_files, output, expected_ids=[p.id for p in proteins], expected_attrs=attrs)


def embed_all(config: dict, split_dir: str | os.PathLike, output_dir: str | os.PathLike,
              batch_size: int | None = None, rank: int = 0, world_size: int = 1,
              barrier=lambda: None) -> None:
    """The seed's one-command embedding: every shard of every split, then gather.

    Under several processes, process r embeds shards r, r+N, ...; rank 0 gathers
    after a barrier. Finished shards (complete files) are not recomputed.
    """
    from .embedding_store import validate_shard

    if batch_size is not None:
        config["embedding"]["batch_size"] = batch_size
    num_shards = config["embedding"]["shards"]
    esm_model = None
    jobs = [(split, i) for split in SPLITS for i in range(num_shards)]
    for n, (split, i) in enumerate(jobs):
        if n % world_size != rank:
            continue
        out = shard_path(output_dir, split, i, num_shards)
        split_file = Path(split_dir) / f"{split}.csv"
        if out.exists():
            try:
                proteins = split_proteins_of(config, split, split_file)
                validate_shard(out, expected_ids=[p.id for p in plan_shards(proteins, num_shards)[i]],
                               expected_attrs={"split_fingerprint": split_fingerprint(proteins)})
                check_store_settings(out, config)
                check_store_ids(out, proteins)  # a shard whose ids were swapped is recomputed, not kept
                log.info("shard %s is complete, skipping", out)
                continue
            except PipelineError as err:
                log.info("recomputing %s: %s", out, err)
        esm_model = esm_model or load_esm_for(config)
        embed_shard(config, split, i, num_shards, split_file, out, esm_model=esm_model)
    barrier()
    if rank == 0:
        for split in SPLITS:
            gather_split(config, split, Path(split_dir) / f"{split}.csv",
                         [str(shard_path(output_dir, split, i, num_shards)) for i in range(num_shards)],
                         split_store_path(output_dir, split))
