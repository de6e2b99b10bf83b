"""Sequence clusters for a split that keeps homologs apart (the cluster stage), with MMseqs2.

Proteins are linked when ``mmseqs easy-search`` (all against all) aligns them at
``dataset.cluster_identity`` or more over ``dataset.cluster_coverage`` of both (``--cov-mode 0``);
clusters are single-linkage groups, so no linked pair is in two clusters. MMseqs2's own
``easy-cluster`` does not promise that: on ``datasets/demo.csv`` at 0.3/0.8 it split 8 of 24 families.
Pairs the search misses are not linked; :func:`identity_to_train` measures what remains.

``clusters.tsv``: a first line ``# ptm-mamba clusters {json}`` records the cluster stage's settings,
the counts and ``rows_sha256`` of the lines below, then ``cluster<TAB>unique_id`` rows (a cluster
is named by its smallest id).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import ID_COLUMN, Protein, read_configured, residue_key
from .errors import PipelineError
from .fileio import atomic_write_text
from .prepare import check_prepared
from .settings import Settings
from .hashing import sha256_of
from .stages import CLUSTER, check_settings, stage_settings

HEADER = "# ptm-mamba clusters "
COLUMNS = f"cluster\t{ID_COLUMN}"
HASH_KEY = "rows_sha256"  # in the first line's record: the hash of the lines below it
MAX_SEARCHED = 1000  # test proteins searched against the training set for the summary
INSTALL_HINT = "apt-get install mmseqs2, conda install -c bioconda mmseqs2, or scripts/install_mmseqs.sh"


@dataclass(frozen=True)
class Hit:
    query: int
    target: int
    identity: float  # MMseqs2's fident: identical positions / alignment length
    query_cover: float
    target_cover: float


def mmseqs() -> str:
    """The mmseqs binary on PATH, or a one-line error saying how to install it."""
    path = shutil.which("mmseqs")
    if path is None:
        raise PipelineError(f"mmseqs (MMseqs2) not found on PATH; dataset.split_by: cluster needs it ({INSTALL_HINT})")
    return path


def mmseqs_version() -> str:
    return subprocess.run([mmseqs(), "version"], capture_output=True, text=True).stdout.strip()


def _write_fasta(path: Path, sequences: list[str]) -> None:
    path.write_text("".join(f">{i}\n{seq}\n" for i, seq in enumerate(sequences)))


def search(queries: list[str], targets: list[str], *, identity: float = 0.0, coverage: float = 0.0,
           threads: int | None = None) -> list[Hit]:
    """MMseqs2 alignments of residue sequences ``queries`` against ``targets`` (hits name list indices),
    at ``identity`` or more over ``coverage`` or more of both sequences."""
    binary = mmseqs()
    with tempfile.TemporaryDirectory(prefix="ptm-mamba-mmseqs-") as tmp:
        tmp = Path(tmp)
        _write_fasta(tmp / "q.fasta", queries)
        _write_fasta(tmp / "t.fasta", targets)
        command = [binary, "easy-search", "q.fasta", "t.fasta", "hits.m8", "work", "-v", "1",
                   "--min-seq-id", str(identity), "-c", str(coverage), "--cov-mode", "0",
                   "--format-output", "query,target,fident,qcov,tcov"]
        if threads:
            command += ["--threads", str(threads)]
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip() or "no message").splitlines()[-1]
            raise PipelineError(f"mmseqs easy-search failed (exit {done.returncode}): {last}")
        rows = [line.split("\t") for line in (tmp / "hits.m8").read_text().splitlines()]
    return [Hit(int(q), int(t), float(i), float(qc), float(tc)) for q, t, i, qc, tc in rows]


def cluster_proteins(proteins: list[Protein], identity: float, coverage: float,
                     threads: int | None = None) -> dict[str, str]:
    """Single-linkage clusters of ``proteins``: id -> cluster name (the cluster's smallest id)."""
    groups: dict[str, list[str]] = {}  # residue sequence -> ids: duplicates are one sequence
    for p in proteins:
        groups.setdefault(residue_key(p), []).append(p.id)
    sequences = list(groups)
    parent = list(range(len(sequences)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for hit in search(sequences, sequences, identity=identity, coverage=coverage, threads=threads):
        parent[root(hit.query)] = root(hit.target)
    members: dict[int, list[str]] = {}
    for i, seq in enumerate(sequences):
        members.setdefault(root(i), []).extend(groups[seq])
    return {pid: min(ids) for ids in members.values() for pid in ids}


def _body(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def clusters_text(clusters: dict[str, str], settings: dict) -> str:
    rows = sorted((c, pid) for pid, c in clusters.items())
    body = [COLUMNS, *(f"{c}\t{p}" for c, p in rows)]
    record = {"settings": settings, "method": "mmseqs easy-search all vs all, single linkage",
              "mmseqs_version": mmseqs_version(), "proteins": len(rows), "clusters": len(set(clusters.values())),
              HASH_KEY: sha256_of(_body(body).encode())}
    return "\n".join([HEADER + json.dumps(record, sort_keys=True), *body]) + "\n"


def run_cluster(settings: Settings, output: str | os.PathLike, threads: int | None = None) -> dict[str, str]:
    """The cluster stage: cluster the configured dataset, write ``output`` atomically."""
    ds = settings.dataset
    check_prepared(settings)
    clusters = cluster_proteins(read_configured(ds), ds.cluster_identity, ds.cluster_coverage, threads)
    atomic_write_text(output, clusters_text(clusters, stage_settings(settings, CLUSTER)))
    return clusters


def read_clusters(path: str | os.PathLike, settings: Settings, proteins: list[Protein]) -> dict[str, str]:
    """The cluster stage's file as id -> cluster, refused if made from other data or settings, or
    edited (the rows' hash), or not naming each protein once."""
    path, fix = Path(path), "rerun the cluster stage (ptm-mamba cluster)"
    edited = f"(an edited file); {fix}"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: {fix}") from None
    except UnicodeDecodeError:
        lines = []
    if len(lines) < 2 or not lines[0].startswith(HEADER) or lines[1] != COLUMNS:
        raise PipelineError(f"{path}: not a clusters file of the cluster stage; {fix}")
    try:
        record = json.loads(lines[0][len(HEADER):])
    except ValueError:
        record = None
    record = record if isinstance(record, dict) else {}
    check_settings(record.get("settings"), settings, CLUSTER, str(path), fix)
    if not isinstance(record.get(HASH_KEY), str) or not isinstance(record.get("proteins"), int):
        raise PipelineError(f"{path}: records no content hash (written by an older version of the cluster stage, "
                            f"or an edited first line); {fix}")
    clusters: dict[str, str] = {}
    for number, line in enumerate(lines[2:], start=3):
        row = line.split("\t")
        if len(row) != 2 or not all(row):
            raise PipelineError(f"{path} line {number}: {line[:60]!r} is not 'cluster<TAB>{ID_COLUMN}' {edited}")
        if row[1] in clusters:
            raise PipelineError(f"{path} line {number}: does not name each protein of the dataset once: {row[1]!r} "
                                f"again {edited}")
        clusters[row[1]] = row[0]
    missing = [p.id for p in proteins if p.id not in clusters]
    if missing:
        raise PipelineError(f"{path}: does not name each protein of the dataset once: {missing[0]!r} is missing"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} {edited}")
    if len(clusters) != len(proteins):
        known = {p.id for p in proteins}
        extra = [pid for pid in clusters if pid not in known]
        raise PipelineError(f"{path}: names {extra[0]!r}, which the dataset lacks"
                            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''} {edited}")
    first: dict[str, Protein] = {}
    for p in proteins:
        other = first.setdefault(residue_key(p), p)
        if clusters[other.id] != clusters[p.id]:
            raise PipelineError(f"{path}: {other.id!r} and {p.id!r} have the same sequence but are in different "
                                f"clusters {edited}")
    if record["proteins"] != len(clusters):
        raise PipelineError(f"{path}: records {record['proteins']} proteins but its rows name {len(clusters)} "
                            f"{edited}")
    if sha256_of(_body(lines[1:]).encode()) != record[HASH_KEY]:
        raise PipelineError(f"{path}: its rows are not those the cluster stage wrote (their hash differs from the "
                            f"one its first line records; a protein moved to another cluster?) {edited}")
    return clusters


def identity_to_train(test: list[Protein], train: list[Protein], *, coverage: float, threshold: float,
                      seed: int, threads: int | None = None, limit: int = MAX_SEARCHED) -> dict:
    """How close test is to train (at most ``limit`` test proteins): ``max_identity`` over alignments
    covering ``coverage`` of both, ``max_local_identity`` over any; None when MMseqs2 reports none."""
    picked = sorted(test, key=lambda p: p.id)
    if len(picked) > limit:
        picked = [picked[i] for i in sorted(np.random.default_rng(seed).choice(len(picked), limit, replace=False))]
    hits = search([residue_key(p) for p in picked], [residue_key(p) for p in train], threads=threads) if picked else []
    covering = [h for h in hits if min(h.query_cover, h.target_cover) >= coverage]
    best = max(covering, key=lambda h: h.identity, default=None)
    return {
        "searched": len(picked),
        "of": len(test),
        "coverage": coverage,
        "max_identity": best.identity if best else None,
        "max_identity_pair": [picked[best.query].id, train[best.target].id] if best else None,
        "pairs_above_threshold": sum(h.identity > threshold for h in covering),
        "max_local_identity": max((h.identity for h in hits), default=None),
    }
