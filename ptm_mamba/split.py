"""Deterministic train/val/test split of a dataset, and the split files as one unit.

The order of the rows in the CSV does not matter: proteins are sorted by id
and then shuffled with ``split_seed``, so the same data and seed give the same
split. Proteins with the same residue sequence (PTMs aside) under different ids
go to the same split, so no sequence is in two of them. Each split is written
as a CSV (``unique_id,ptm_seq``), with ``split_mapping.json`` (id -> split) and
``summary.json`` beside them.

The five files are one unit: they are renamed into place together, with
``summary.json`` last, and it records the settings the split was made with and
the sha256 of the other four. :func:`load_split_dir` is how later stages read
a split: it refuses files of another split (an interrupted or edited split), a
split made from other data or settings, and splits that share an id or a
sequence.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from .dataset import Protein, read_dataset, read_from_config
from .errors import PipelineError
from .fileio import write_together
from .stages import SPLIT, check_settings, stage_settings
from .tokenizer import PTMTokenizer

SPLITS = ("train", "val", "test")
ID_COLUMN, SEQUENCE_COLUMN = "unique_id", "ptm_seq"
MAPPING, SUMMARY = "split_mapping.json", "summary.json"
DUPLICATE_CRITERION = "the same residue sequence (PTM tokens read as their residues)"


def _size(value: float, n: int) -> int:
    return int(value) if float(value).is_integer() else int(round(value * n))


def residue_key(protein: Protein, tokenizer: PTMTokenizer = PTMTokenizer()) -> str:
    """What makes two proteins duplicates of each other: their unmodified residue sequence."""
    return tokenizer.residue_sequence(list(protein.tokens))


def split_proteins(proteins: list[Protein], *, val_size: float, test_size: float,
                   seed: int, source: str = "dataset") -> dict[str, list[Protein]]:
    """Split into train/val/test; sizes are counts or fractions of the whole.

    Proteins are visited in a seeded random order; the first one of each duplicate group
    seen takes its whole group to the split being filled (val, then test, then train), so
    val and test can exceed their size by a group's extra members.
    """
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
    groups: dict[str, list[Protein]] = {}
    for p in ordered:
        groups.setdefault(residue_key(p), []).append(p)
    splits: dict[str, list[Protein]] = {name: [] for name in SPLITS}
    placed: set[str] = set()
    for i in np.random.default_rng(seed).permutation(n):
        key = residue_key(ordered[i])
        if key in placed:
            continue
        placed.add(key)
        name = "val" if len(splits["val"]) < n_val else "test" if len(splits["test"]) < n_test else "train"
        splits[name].extend(groups[key])
    if not splits["train"]:
        raise PipelineError(f"{source}: no training data left once duplicate sequences are kept together "
                            f"(val {len(splits['val'])}, test {len(splits['test'])} of {n} sequences)")
    return splits


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


def summarize(splits: dict[str, list[Protein]]) -> dict:
    """Counts per split: proteins, residues, PTM sites, the longest protein."""
    return {
        name: {
            "sequences": len(proteins),
            "residues": sum(p.length for p in proteins),
            "ptm_sites": sum(p.num_ptms for p in proteins),
            "max_length": max((p.length for p in proteins), default=0),
            "fingerprint": split_fingerprint(proteins),
        }
        for name, proteins in splits.items()
    }


def duplicate_counts(splits: dict[str, list[Protein]]) -> dict:
    """How many groups of duplicate sequences (under different ids) the data has, kept together."""
    sizes: dict[str, int] = {}
    for proteins in splits.values():
        for p in proteins:
            key = residue_key(p)
            sizes[key] = sizes.get(key, 0) + 1
    groups = [n for n in sizes.values() if n > 1]
    return {"criterion": DUPLICATE_CRITERION, "groups": len(groups), "proteins": sum(groups)}


def split_csv_text(proteins: list[Protein]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([ID_COLUMN, SEQUENCE_COLUMN])
    writer.writerows([p.id, p.sequence] for p in proteins)
    return buf.getvalue()


def read_split(path: str | os.PathLike, unknown_ptm: str = "error") -> list[Protein]:
    """Read one split file written by the split stage (unchecked; see :func:`load_split_dir`)."""
    return read_dataset(path, sequence_column=SEQUENCE_COLUMN, id_column=ID_COLUMN, unknown_ptm=unknown_ptm)


def split_paths(output_dir: str | os.PathLike) -> dict[str, Path]:
    out = Path(output_dir)
    paths = {name: out / f"{name}.csv" for name in SPLITS}
    paths["mapping"] = out / MAPPING
    paths["summary"] = out / SUMMARY
    return paths


def mapping(splits: dict[str, list[Protein]]) -> dict[str, str]:
    return {p.id: name for name in SPLITS for p in splits[name]}


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def run_split(config: dict, output_dir: str | os.PathLike) -> dict:
    """The split stage: validate the data, split it, write the five files as one unit."""
    splits = split_from_config(config)
    paths = split_paths(output_dir)
    texts = {paths[name]: split_csv_text(splits[name]) for name in SPLITS}
    texts[paths["mapping"]] = json.dumps(mapping(splits), indent=2) + "\n"
    summary = {
        "splits": summarize(splits),
        "duplicates": duplicate_counts(splits),
        "settings": stage_settings(config, SPLIT),
        "files": {path.name: _sha256(text.encode("utf-8")) for path, text in texts.items()},
    }
    texts[paths["summary"]] = json.dumps(summary, indent=2) + "\n"  # last: the unit's commit record
    write_together(texts)
    return summary


def check_disjoint(splits: dict[str, list[Protein]], where: str) -> None:
    """Refuse splits that share an id or a sequence (one line naming both splits)."""
    seen_id: dict[str, str] = {}
    seen_seq: dict[str, tuple[str, str]] = {}
    for name in SPLITS:
        for p in splits.get(name, []):
            if seen_id.get(p.id, name) != name:
                raise PipelineError(f"{where}: id {p.id!r} is in both {seen_id[p.id]} and {name}")
            seen_id[p.id] = name
            key = residue_key(p)
            other = seen_seq.setdefault(key, (name, p.id))
            if other[0] != name:
                raise PipelineError(f"{where}: {other[1]!r} ({other[0]}) and {p.id!r} ({name}) have the same "
                                    "sequence; overlapping splits leak proteins, rerun the split stage")


def load_split_dir(split_dir: str | os.PathLike, config: dict) -> dict[str, list[Protein]]:
    """The split stage's proteins, after checking that the folder holds one complete split,
    made from this config's data and settings, with no protein in two splits."""
    paths = split_paths(split_dir)
    fix = "rerun the split stage"
    try:
        summary = json.loads(paths["summary"].read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{paths['summary']} not found: {fix} (ptm-mamba split)") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{paths['summary']}: unreadable ({exc}); {fix}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("files"), dict):
        raise PipelineError(f"{paths['summary']}: not written by this version's split stage; {fix}")
    check_settings(summary.get("settings"), config, SPLIT, str(paths["summary"]), fix)
    for key in (*SPLITS, "mapping"):
        path = paths[key]
        try:
            found = _sha256(path.read_bytes())
        except FileNotFoundError:
            raise PipelineError(f"{path} not found: the split is incomplete; {fix}") from None
        if found != summary["files"].get(path.name):
            raise PipelineError(f"{path} is not the file {SUMMARY} records (an interrupted or edited split); {fix}")
    splits = {name: read_split(paths[name], config["dataset"]["unknown_ptm"]) for name in SPLITS}
    check_disjoint(splits, str(split_dir))
    return splits
