"""Inference: logits and per-residue hidden states of a trained PTM-Mamba for PTM sequences.

``ptm-mamba predict`` reads a CSV (``unique_id``, ``ptm_seq``) or FASTA of PTM sequences and
writes the final hidden states in the embedding-store layout (``EmbeddingReader``; ``split`` is
"predict"). With ``pooled`` the file also holds dataset ``pooled`` (n, d_model) float32, each
protein's mean over its residues (:func:`read_pooled`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .batching import plan_batches
from .data import BatchBuilder
from .dataset import Protein, _read_text, read_dataset
from .device import choose_device, describe, summary
from .embedding_store import EmbeddingReader, ShardWriter
from .errors import PipelineError, one_line
from .settings import EsmSettings
from .tokenizer import PTMTokenizer, residue_rows, rows_of


def _proteins(sequences: list[str]) -> list[Protein]:
    tok = PTMTokenizer()
    return [Protein(f"seq{i}", s, tuple(tok.split(s))) for i, s in enumerate(sequences)]


def _short_identity(identity: str) -> str:
    """An ESM-2 identity with its content hash cut to 12 hex digits (name@sha256:abc..., sha256:abc...)."""
    return re.sub(r"(sha256:[0-9a-f]{12})[0-9a-f]+", r"\1", identity)


def load_trained_esm(esm: EsmSettings, trained_esm: str | None, device):
    """The ESM-2 of ``esm`` on ``device``, refused unless its weights are ``trained_esm`` (the identity
    the training run recorded; None: unchecked), both from :func:`ptm_mamba.checkpoint.load_model`."""
    from .esm import load_esm
    from .esm_weights import esm_identity

    if trained_esm is not None and esm_identity(esm.model) != trained_esm:
        raise PipelineError(f"ESM model {esm.model}: not the weights this model was trained with "
                            f"({_short_identity(esm_identity(esm.model))}, trained with {_short_identity(trained_esm)}); "
                            "put the training's ESM-2 file back at that path")
    return load_esm(esm.model, esm.repr_layer, device=device)


def _esm_for(model, esm_model, esm: EsmSettings | None, trained_esm: str | None):
    if not model.config.use_esm or esm_model is not None:
        return esm_model
    if esm is None:
        raise PipelineError("this model uses ESM-2 features but its checkpoint names no ESM model: "
                            "pass esm_model=load_esm(...)")
    return load_trained_esm(esm, trained_esm, next(model.parameters()).device)


@torch.no_grad()
def predict_batches(model, proteins: list[Protein], esm_model=None, max_tokens_per_batch: int | None = None,
                    progress: bool = False, esm: EsmSettings | None = None, trained_esm: str | None = None):
    """Yield ``(protein indices, logits (B, T, V), hidden (B, T, d), lengths (B,))`` batch by batch."""
    from .forward import forward_batch

    esm_model = _esm_for(model, esm_model, esm, trained_esm)
    device = next(model.parameters()).device
    builder = BatchBuilder(proteins, max_sequence_length=rows_of(max(p.length for p in proteins)), mask_prob=0.0,
                           random_mask_only_prob=1.0,
                           esm_alphabet=esm_model.alphabet if esm_model is not None else None)
    if max_tokens_per_batch is None:
        from .config import schema_default

        max_tokens_per_batch = schema_default("predict.max_tokens_per_batch")
    batches = plan_batches(builder.lengths, max_tokens_per_batch)
    for indices in tqdm(batches, disable=not progress, unit="batch"):
        batch = builder.build(indices, replicate=0, generator=None).to(device)
        out = forward_batch(model, batch, esm_model)
        yield indices, out.logits, out.hidden_states, batch.lengths


def predict(model, sequences: list[str], esm_model=None, max_tokens_per_batch: int | None = None, *,
            esm: EsmSettings | None = None, trained_esm: str | None = None) -> list:
    """Per PTM sequence, a ``ModelOutput`` of logits (L+2, V) and hidden states (L+2, d). ESM-2
    features (PTMs masked as in training) come from ``esm_model``, else ``esm``, refused unless its
    weights are ``trained_esm`` (both from :func:`ptm_mamba.checkpoint.load_model`)."""
    from .model import ModelOutput

    proteins = _proteins(sequences)
    results: list = [None] * len(proteins)
    for indices, logits, hidden, lengths in predict_batches(model, proteins, esm_model, max_tokens_per_batch,
                                                            esm=esm, trained_esm=trained_esm):
        for row, i in enumerate(indices):
            n = int(lengths[row])
            results[i] = ModelOutput(logits=logits[row, :n].cpu(), hidden_states=hidden[row, :n].cpu())
    return results


def read_sequences(path: str | os.PathLike) -> list[Protein]:
    """Proteins of a CSV (``unique_id``, ``ptm_seq``) or FASTA file."""
    path = Path(path)
    if path.suffix.lower() in (".fa", ".fasta", ".faa"):
        return read_fasta(path)
    return read_dataset(path)


def read_fasta(path: Path) -> list[Protein]:
    tok = PTMTokenizer()
    records: list[tuple[int, str, list[str]]] = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):  # UTF-8 (a BOM is fine), else one line
        line = line.strip()
        if line.startswith(">"):
            records.append((n, line[1:].split()[0] if line[1:].strip() else "", []))
        elif line:
            if not records:
                raise PipelineError(f"{path} line {n}: sequence before the first '>' header")
            records[-1][2].append(line)
    proteins, seen = [], set()
    for n, pid, parts in records:
        seq = "".join(parts)
        if not pid or not seq or pid in seen:
            raise PipelineError(f"{path} line {n}: {'empty header' if not pid else 'no sequence' if not seq else f'duplicate id {pid!r}'}")
        seen.add(pid)
        try:
            proteins.append(Protein(pid, seq, tuple(tok.split(seq))))
        except ValueError as exc:
            raise PipelineError(f"{path} line {n} (id {pid}): {exc}") from None
    if not proteins:
        raise PipelineError(f"{path}: no sequences")
    return proteins


def _check_output(output: Path, **inputs: Path) -> None:
    """Refuse an output path that is a folder or one of the inputs (it would be replaced)."""
    from .guard import refuse_overwrite

    if output.is_dir():
        raise PipelineError(f"output {output} is a directory; give a file name")
    refuse_overwrite({"output": output}, {f"the {what}": path for what, path in inputs.items()})


def _check_esm_output(output: Path, model, esm: EsmSettings | None) -> None:
    """Refuse an output that is a file of the ESM-2 weights the model runs with."""
    from .esm_weights import weight_files

    if model.config.use_esm and esm is not None and esm.model:
        _check_output(output, **{f"ESM-2 weights ({f.name})": f for f in weight_files(esm.model)})


POOLED = "pooled"


def write_predictions(checkpoint_path: str | os.PathLike, input_path: str | os.PathLike,
                      output: str | os.PathLike, device: str | None = None, max_tokens_per_batch: int | None = None,
                      pooled: bool = True, progress: bool = True) -> int:
    """Hidden states of every protein of ``input_path`` into ``output`` (HDF5, atomic), and with
    ``pooled`` their means over residues (dataset ``pooled``)."""
    from .checkpoint import load_model

    _check_output(Path(output), input=Path(input_path), checkpoint=Path(checkpoint_path))
    device = choose_device(device, [], "predict", cpu_option="use --device cpu")
    trained = load_model(checkpoint_path, device=device)
    model = trained.model
    _check_esm_output(Path(output), model, trained.esm)
    proteins = read_sequences(input_path)
    print(f"predict runs on {summary(describe(device))}", flush=True)  # stdout: stderr is for what went wrong
    digest = hashlib.sha256("".join(p.id + p.sequence for p in proteins).encode()).hexdigest()[:24]
    attrs = {"split": "predict", "split_fingerprint": digest}
    means = np.zeros((len(proteins), model.config.d_model), dtype=np.float32)  # rows in writing order
    with ShardWriter(output, dim=model.config.d_model, replicates=1, attrs=attrs) as writer:
        batches = predict_batches(model, proteins, None, max_tokens_per_batch, progress, trained.esm,
                                  trained.trained_esm)
        written = 0
        for indices, _, hidden, lengths in batches:
            for row, i in enumerate(indices):
                states = hidden[row, :int(lengths[row])].float().cpu().numpy()
                writer.add(proteins[i].id, [states], [np.zeros(len(states), dtype=bool)])
                residues = len(states) - rows_of(0)
                if residues > 0:
                    means[written] = states[residue_rows(residues)].mean(axis=0)
                written += 1
        if pooled:
            writer.add_dataset(POOLED, means,
                               about="mean over residues of the final hidden states, row i for ids[i]")
    return len(proteins)


def read_pooled(path: str | os.PathLike, ids: list[str]) -> np.ndarray:
    """Pooled embeddings (len(ids), d_model) float32 of ``ids`` from a ``ptm-mamba predict`` file;
    reads only their rows."""
    import h5py

    with EmbeddingReader(path) as store:  # checks the file and maps ids to rows
        rows = np.array([store.index(i) for i in ids], dtype=np.int64)
    with h5py.File(path, "r", locking=False) as f:
        if POOLED not in f:
            raise PipelineError(f"{path}: no pooled embeddings (written with --no-pooled)")
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing rows
        try:
            data = f[POOLED][unique] if len(unique) else np.zeros((0, f[POOLED].shape[1]), np.float32)
        except OSError as exc:  # a failed checksum, a truncated file
            raise PipelineError(f"{path}: pooled embeddings unreadable: {one_line(exc)}") from None
    return data[inverse]
