"""Deterministic train/val/test split of a dataset, and the split files as one unit.

The order of the rows in the CSV does not matter: proteins are sorted by id and then shuffled with
``split_seed``. Proteins with the same residue sequence (PTMs aside) under different ids go to the
same split, so no sequence is in two of them. With ``dataset.split_by: cluster`` whole sequence
clusters (:mod:`ptm_mamba.cluster`) go to one split each, so no val/test protein is a close homolog
of a training one.

The five files are one unit, renamed into place with ``summary.json`` last; it records the
settings and the sha256 of the other four, which :func:`load_split_dir` checks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter

import numpy as np

from .cluster import cluster_proteins, identity_to_train, read_clusters
from .dataset import ID_COLUMN, SEQUENCE_COLUMN, Protein, read_configured, read_dataset, residue_key
from .errors import PipelineError
from .fileio import write_together
from .layout import SPLIT_SUMMARY, SPLITS, split_paths
from .prepare import check_prepared
from .settings import DatasetSettings, Settings
from .hashing import sha256_of
from .stages import SPLIT, check_settings, stage_settings

DUPLICATE_CRITERION = "the same residue sequence (PTM tokens read as their residues)"


def _size(value: float, n: int) -> int:
    return int(value) if float(value).is_integer() else int(round(value * n))


def _targets(n: int, val_size: float, test_size: float, source: str) -> tuple[int, int]:
    """The val and test sizes in proteins, refused in one line when they leave a split empty."""
    n_val, n_test = _size(val_size, n), _size(test_size, n)
    if n_val < 1 or n_test < 1:
        raise PipelineError(
            f"{source}: dataset.val_size ({val_size}) and dataset.test_size ({test_size}) "
            f"must each give at least one of the {n} sequences")
    if n_val + n_test >= n:
        raise PipelineError(
            f"{source}: dataset.val_size ({n_val}) + dataset.test_size ({n_test}) leave no training "
            f"data: the dataset has {n} sequences")
    return n_val, n_test


def split_proteins(proteins: list[Protein], *, val_size: float, test_size: float,
                   seed: int, source: str = "dataset") -> dict[str, list[Protein]]:
    """Split into train/val/test; sizes are counts or fractions. A duplicate group goes whole to
    the split being filled, so val and test can exceed their size by its extra members."""
    n = len(proteins)
    n_val, n_test = _targets(n, val_size, test_size, source)
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


def split_clusters(proteins: list[Protein], clusters: dict[str, str], *, val_size: float, test_size: float,
                   seed: int, source: str = "dataset") -> dict[str, list[Protein]]:
    """Split whole clusters (id -> cluster) into train/val/test; sizes as in :func:`split_proteins`.

    A cluster goes to val or test only where it fits, so they never exceed their size.
    """
    n_val, n_test = _targets(len(proteins), val_size, test_size, source)
    members: dict[str, list[Protein]] = {}
    for p in sorted(proteins, key=lambda p: p.id):
        members.setdefault(clusters[p.id], []).append(p)
    names = sorted(members)
    splits: dict[str, list[Protein]] = {name: [] for name in SPLITS}
    room = {"val": n_val, "test": n_test}
    for i in np.random.default_rng(seed).permutation(len(names)):
        group = members[names[i]]
        name = next((s for s in ("val", "test") if len(group) <= room[s] - len(splits[s])), "train")
        splits[name].extend(group)
    for name in ("val", "test"):
        if not splits[name]:
            raise PipelineError(f"{source}: no whole cluster fits in the {name} split (val {n_val}, test {n_test} "
                                f"of {len(proteins)} sequences in {len(names)} clusters, the largest "
                                f"{max(map(len, members.values()))}); change dataset.val_size/test_size or "
                                "dataset.cluster_identity")
    return splits


def _split(settings: Settings, clusters_file: str | os.PathLike | None = None,
           threads: int | None = None) -> tuple[dict[str, list[Protein]], dict[str, str] | None]:
    """The split as ``dataset.split_by`` says, and the clusters (id -> cluster) it was made from, if any.
    Without ``clusters_file`` the clusters are made here (as the cluster stage would)."""
    ds = settings.dataset
    check_prepared(settings)
    proteins = read_configured(ds)
    sizes = dict(val_size=ds.val_size, test_size=ds.test_size, seed=ds.split_seed, source=ds.dataset_location)
    if not ds.by_cluster:
        return split_proteins(proteins, **sizes), None
    if clusters_file is not None:
        clusters = read_clusters(clusters_file, settings, proteins)
    else:
        clusters = cluster_proteins(proteins, ds.cluster_identity, ds.cluster_coverage, threads)
    return split_clusters(proteins, clusters, **sizes), clusters


def split_from_config(settings: Settings) -> dict[str, list[Protein]]:
    """The split the split stage would make (without writing it)."""
    return _split(settings)[0]


def split_fingerprint(proteins: list[Protein]) -> str:
    """A hash of a split's ids and sequences, stored with its embeddings to catch stale files."""
    digest = hashlib.sha256()
    for p in proteins:
        digest.update(p.id.encode() + b"\t" + p.sequence.encode() + b"\n")
    return digest.hexdigest()[:24]


def summarize(splits: dict[str, list[Protein]]) -> dict:
    """Counts per split: proteins, residues, PTM sites (known ones; unknown ones, read as ``<unk>``,
    apart), the longest protein."""
    return {
        name: {
            "sequences": len(proteins),
            "residues": sum(p.length for p in proteins),
            "ptm_sites": sum(p.num_ptms for p in proteins),
            "unknown_ptm_sites": sum(p.num_unknown_ptms for p in proteins),
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


def mapping(splits: dict[str, list[Protein]]) -> dict[str, str]:
    return {p.id: name for name in SPLITS for p in splits[name]}


def cluster_summary(splits: dict[str, list[Protein]], clusters: dict[str, str], dataset: DatasetSettings,
                    threads: int | None = None) -> dict:
    """The clusters behind a split by clusters, and how close its test set is to its training set."""
    sizes = list(Counter(clusters.values()).values())
    return {
        "identity": dataset.cluster_identity,
        "coverage": dataset.cluster_coverage,
        "clusters": len(sizes),
        "largest": max(sizes),
        "singletons": sizes.count(1),
        "test_vs_train": identity_to_train(splits["test"], splits["train"], coverage=dataset.cluster_coverage,
                                           threshold=dataset.cluster_identity, seed=dataset.split_seed,
                                           threads=threads),
    }


def run_split(settings: Settings, output_dir: str | os.PathLike, clusters_file: str | os.PathLike | None = None,
              threads: int | None = None) -> dict:
    """The split stage: validate the data, split it, write the five files as one unit."""
    splits, clusters = _split(settings, clusters_file, threads)
    paths = split_paths(output_dir)
    texts = {paths[name]: split_csv_text(splits[name]) for name in SPLITS}
    texts[paths["mapping"]] = json.dumps(mapping(splits), indent=2) + "\n"
    summary = {"splits": summarize(splits), "duplicates": duplicate_counts(splits)}
    if clusters is not None:
        summary["clusters"] = cluster_summary(splits, clusters, settings.dataset, threads)
        for name in SPLITS:
            summary["splits"][name]["clusters"] = len({clusters[p.id] for p in splits[name]})
        summary["splits"]["test"]["max_identity_to_train"] = summary["clusters"]["test_vs_train"]["max_identity"]
    summary["settings"] = stage_settings(settings, SPLIT)
    summary["files"] = {path.name: sha256_of(text.encode("utf-8")) for path, text in texts.items()}
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


def load_split_dir(split_dir: str | os.PathLike, settings: Settings) -> dict[str, list[Protein]]:
    """The split stage's proteins, after checking that the folder holds one complete split,
    made from these settings' data and settings, with no protein in two splits."""
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
    check_settings(summary.get("settings"), settings, SPLIT, str(paths["summary"]), fix)
    for key in (*SPLITS, "mapping"):
        path = paths[key]
        try:
            found = sha256_of(path.read_bytes())
        except FileNotFoundError:
            raise PipelineError(f"{path} not found: the split is incomplete; {fix}") from None
        if found != summary["files"].get(path.name):
            raise PipelineError(f"{path} is not the file {SPLIT_SUMMARY} records (an interrupted or edited split); {fix}")
    splits = {name: read_split(paths[name], settings.dataset.unknown_ptm) for name in SPLITS}
    check_disjoint(splits, str(split_dir))
    return splits
