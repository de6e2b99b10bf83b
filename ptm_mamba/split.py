"""Deterministic train/val/test split of a dataset, and the split files.

The order of the rows in the CSV does not matter: proteins are sorted by id
and then shuffled with ``split_seed``, so the same data and seed give the same
split. Each split is written as a CSV (``unique_id,ptm_seq``), with
``split_mapping.json`` (id -> split) and ``summary.json`` beside them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from .dataset import Protein, read_dataset, read_from_config
from .errors import PipelineError
from .fileio import atomic_path, atomic_write_json

SPLITS = ("train", "val", "test")
ID_COLUMN, SEQUENCE_COLUMN = "unique_id", "ptm_seq"


def _size(value: float, n: int) -> int:
    return int(value) if float(value).is_integer() else int(round(value * n))


def split_proteins(proteins: list[Protein], *, val_size: float, test_size: float,
                   seed: int, source: str = "dataset") -> dict[str, list[Protein]]:
    """Split into train/val/test; sizes are counts or fractions of the whole."""
    n = len(proteins)
    n_val, n_test = _size(val_size, n), _size(test_size, n)
    if n_val < 1 or n_test < 1:
        raise PipelineError(
            f"{source}: dataset.val_size ({val_size}) and dataset.test_size ({test_size}) "
            f"must each give at least one of the {n} sequences")
    if n_val + n_test >= n:
        raise PipelineError(
            f"{source}: dataset.val_size ({n_val}) + dataset.test_size ({n_test}) leave no training "
            f"data: the dataset has {n} sequences")
    ordered = sorted(proteins, key=lambda p: p.id)
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in order]
    return {"train": shuffled[n_val + n_test:], "val": shuffled[:n_val],
            "test": shuffled[n_val:n_val + n_test]}


def split_from_config(config: dict) -> dict[str, list[Protein]]:
    ds = config["dataset"]
    return split_proteins(read_from_config(config), val_size=ds["val_size"], test_size=ds["test_size"],
                          seed=ds["split_seed"], source=ds["dataset_location"])


def split_fingerprint(proteins: list[Protein]) -> str:
    """A hash of a split's ids and sequences, stored with its embeddings to catch stale files."""
    digest = hashlib.sha256()
    for p in proteins:
        digest.update(p.id.encode() + b"\t" + p.sequence.encode() + b"\n")
    return digest.hexdigest()[:24]


def summarize(splits: dict[str, list[Protein]], max_sequence_length: int) -> dict:
    """Counts per split: proteins, residues, PTM sites, proteins cropped in training."""
    max_residues = max_sequence_length - 2  # <cls> and <eos> take two places
    summary = {}
    for name, proteins in splits.items():
        summary[name] = {
            "sequences": len(proteins),
            "residues": sum(p.length for p in proteins),
            "ptm_sites": sum(p.num_ptms for p in proteins),
            "longer_than_max_sequence_length": sum(p.length > max_residues for p in proteins),
            "max_length": max((p.length for p in proteins), default=0),
            "fingerprint": split_fingerprint(proteins),
        }
    return summary


def write_split_csv(proteins: list[Protein], path: str | os.PathLike) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([ID_COLUMN, SEQUENCE_COLUMN])
    writer.writerows([p.id, p.sequence] for p in proteins)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def read_split(path: str | os.PathLike, unknown_ptm: str = "error") -> list[Protein]:
    """Read a split file written by :func:`write_split_csv`."""
    return read_dataset(path, sequence_column=SEQUENCE_COLUMN, id_column=ID_COLUMN, unknown_ptm=unknown_ptm)


def split_paths(output_dir: str | os.PathLike) -> dict[str, Path]:
    out = Path(output_dir)
    paths = {name: out / f"{name}.csv" for name in SPLITS}
    paths["mapping"] = out / "split_mapping.json"
    paths["summary"] = out / "summary.json"
    return paths


def mapping(splits: dict[str, list[Protein]]) -> dict[str, str]:
    return {p.id: name for name in SPLITS for p in splits[name]}


def run_split(config: dict, output_dir: str | os.PathLike) -> dict:
    """The split stage: validate the data, split it, write every file atomically."""
    splits = split_from_config(config)
    paths = split_paths(output_dir)
    summary = summarize(splits, config["dataset"]["max_sequence_length"])
    for name in SPLITS:
        write_split_csv(splits[name], paths[name])
    atomic_write_json(paths["mapping"], mapping(splits))
    atomic_write_json(paths["summary"], summary)
    return summary
