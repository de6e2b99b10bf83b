"""dataset.split_by: cluster, with the real MMseqs2 binary: no homolog pair across splits, duplicates
together, sizes kept, deterministic, stale clusters refused, and the cluster stage reruns only when
the data or the clustering settings change.

The data: the first 60 short demo proteins (unrelated), the demo's 24 homolog families (a founder and
copies at 90/70/50/40% identity, 5 consecutive ids each) and two duplicates without PTMs.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, REPO, error_line, run_cli, settings_for, write_config, write_csv
from ptm_mamba.cluster import identity_to_train, read_clusters, search
from ptm_mamba.config import load_config
from ptm_mamba.dataset import residue_key
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import CLUSTERS_FILE, SPLIT_DIR, report_files, split_paths
from ptm_mamba.split import SPLITS, load_split_dir, run_split, split_clusters
from ptm_mamba.stages import CLUSTER, SPLIT, stage_settings
from ptm_mamba.tokenizer import PTMTokenizer

needs_mmseqs = pytest.mark.skipif(shutil.which("mmseqs") is None, reason="needs mmseqs (scripts/install_mmseqs.sh)")

IDENTITY, COVERAGE, FAMILY = 0.3, 0.8, 5


def residues(seq: str) -> str:
    tokenizer = PTMTokenizer()
    return tokenizer.residue_sequence(tokenizer.split(seq))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The data set, its config, the families (lists of ids) and the duplicate pairs."""
    root = tmp_path_factory.mktemp("cluster")
    with open(DEMO, newline="") as fh:
        rows = [tuple(row) for row in csv.reader(fh)][1:]
    short = [row for row in rows[:2000] if len(row[1]) < 400][:60]
    families = [[uid for uid, _ in rows[i:i + FAMILY]] for i in range(2000, len(rows), FAMILY)]
    dups = [("DUP_F", residues(rows[2001][1])), ("DUP_S", residues(short[0][1]))]  # same residues, no PTMs
    path = write_csv(root / "data.csv", short + rows[2000:] + dups)
    config = write_config(root / "config.yaml", dataset={
        "dataset_location": str(path), "val_size": 20, "test_size": 20, "split_by": "cluster"})
    return {"root": root, "config": config, "families": families,
            "duplicates": [("DUP_F", rows[2001][0]), ("DUP_S", short[0][0])]}


@pytest.fixture(scope="module")
def made(data) -> dict:
    """The cluster stage (as its own process: the real command, once), then the split stage reading
    its file, through the CLI."""
    root = data["root"]
    result = run_cli("cluster", "--config", data["config"], "--output", root / "clusters.tsv", "--threads", "2",
                     own_process=True)
    assert result.returncode == 0, result.stderr
    assert "182 proteins in 84 clusters" in result.stdout  # 60 unrelated, 24 families; duplicates join theirs
    result = run_cli("split", "--config", data["config"], "--output_dir", root / "split",
                     "--clusters", root / "clusters.tsv", "--threads", "2")
    assert result.returncode == 0, result.stderr
    config = load_config(data["config"])
    return {"config": config, "splits": load_split_dir(root / "split", settings_for(config)), "stdout": result.stdout, "root": root,
            "summary": json.loads(split_paths(root / "split")["summary"].read_text())}


def where(splits: dict) -> dict[str, str]:
    return {p.id: name for name, proteins in splits.items() for p in proteins}


def hamming_identity(a: str, b: str) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def max_cross_identity(splits: dict) -> float:
    """Highest identity, computed directly, between a val/test protein and a training protein of the
    same length (every family copy has its founder's length: substitutions only)."""
    train = [residue_key(p) for p in splits["train"]]
    return max(hamming_identity(residue_key(p), t) for name in ("val", "test") for p in splits[name]
               for t in train if len(t) == p.length)


@needs_mmseqs
def test_no_homolog_pair_across_splits(data, made):
    splits, at = made["splits"], where(made["splits"])
    for family in data["families"]:
        assert len({at[uid] for uid in family}) == 1, family
    for a, b in data["duplicates"]:
        assert at[a] == at[b], (a, b)
    assert max_cross_identity(splits) < IDENTITY
    # and MMseqs2, searching val and test against train, finds no alignment above the threshold
    held_out = [residue_key(p) for name in ("val", "test") for p in splits[name]]
    hits = search(held_out, [residue_key(p) for p in splits["train"]], identity=IDENTITY, coverage=COVERAGE)
    assert [h for h in hits if h.identity > IDENTITY] == []


@needs_mmseqs
def test_random_split_of_the_same_data_puts_homologs_across(data, made):
    config = copy.deepcopy(made["config"])
    config["dataset"]["split_by"] = "random"
    summary = run_split(settings_for(config), data["root"] / "random")
    splits = load_split_dir(data["root"] / "random", settings_for(config))
    assert max_cross_identity(splits) >= 0.7  # what the cluster split prevents
    assert "clusters" not in summary and "clusters" not in summary["splits"]["test"]


@needs_mmseqs
def test_sizes_counts_and_summary(made):
    summary, splits = made["summary"], made["splits"]
    assert [len(splits[name]) for name in SPLITS] == [142, 20, 20]  # enough small clusters to fill val/test
    clusters = summary["clusters"]
    assert (clusters["clusters"], clusters["largest"], clusters["identity"], clusters["coverage"]) == (84, 6, 0.3, 0.8)
    assert sum(summary["splits"][name]["clusters"] for name in SPLITS) == 84
    near = clusters["test_vs_train"]
    assert (near["searched"], near["of"], near["pairs_above_threshold"]) == (20, 20, 0)
    assert near["max_identity"] is None or near["max_identity"] <= IDENTITY
    assert summary["splits"]["test"]["max_identity_to_train"] == near["max_identity"]
    # a large test set is sampled (here: 3 of 20)
    sampled = identity_to_train(splits["test"], splits["train"], coverage=COVERAGE, threshold=IDENTITY, seed=42,
                                limit=3)
    assert (sampled["searched"], sampled["of"]) == (3, 20)
    assert "test vs train:" in made["stdout"] and " clusters, " in made["stdout"]
    assert summary["settings"]["dataset.split_by"] == "cluster"
    # the report's splits table shows the clusters and the test set's highest identity to training
    from ptm_mamba.report import split_table

    summary_file = split_paths(made["root"] / "split")["summary"]
    table = split_table(summary_file, report_files(made["root"])["splits"]).read_text()
    header, *rows = [line.split("\t") for line in table.splitlines()]
    assert header[-3:] == ["clusters", "max_identity_to_train", "fingerprint"]
    assert [(r[0], r[-3]) for r in rows] == [("train", str(summary["splits"]["train"]["clusters"])),
                                            ("val", str(summary["splits"]["val"]["clusters"])),
                                            ("test", str(summary["splits"]["test"]["clusters"])), ("total", "84")]


@needs_mmseqs
def test_split_is_deterministic_and_depends_on_the_seed(data, made):
    root, config = data["root"], made["config"]
    run_split(settings_for(config), root / "in-process", threads=1)  # no clusters file: clustered here (other threads)
    for key in (*SPLITS, "mapping"):
        assert split_paths(root / "in-process")[key].read_bytes() == split_paths(root / "split")[key].read_bytes(), key
    other = copy.deepcopy(config)
    other["dataset"]["split_seed"] = 7
    run_split(settings_for(other), root / "seed7", clusters_file=root / "clusters.tsv")
    assert where(load_split_dir(root / "seed7", settings_for(other))) != where(made["splits"])


def test_whole_clusters_fill_val_and_test_as_closely_as_they_allow():
    from ptm_mamba.dataset import Protein

    def clustered(sizes: list[int]) -> tuple[list[Protein], dict[str, str]]:
        ids = {f"C{c}_{i}": f"C{c}" for c, size in enumerate(sizes) for i in range(size)}
        return [Protein(pid, "MK", ("M", "K")) for pid in ids], ids

    def check(sizes: list[int], val: int, test: int, seed: int) -> tuple[int, int]:
        proteins, clusters = clustered(sizes)
        splits = split_clusters(proteins, clusters, val_size=val, test_size=test, seed=seed)
        placed = [{clusters[p.id] for p in splits[name]} for name in SPLITS]
        assert sum(map(len, placed)) == len(set(clusters.values()))  # each cluster whole, in one split
        assert len(splits["val"]) <= val and len(splits["test"]) <= test  # never more than asked for
        return len(splits["val"]), len(splits["test"])

    for seed in range(20):
        # singletons enough for what bigger clusters leave: the sizes are met exactly
        assert check([7, 6, 5, 4, 3, 2, 2] + [1] * 9, 5, 4, seed) == (5, 4), seed
        check([7, 6, 5, 4, 3, 2, 2, 1], 5, 4, seed)
    with pytest.raises(PipelineError, match=r"no whole cluster fits in the val split .* the largest 7"):
        split_clusters(*clustered([7, 6]), val_size=3, test_size=3, seed=0)


@needs_mmseqs
def test_stale_or_edited_clusters_file_is_refused(data, made, tmp_path):
    root, config = data["root"], made["config"]
    tsv = root / "clusters.tsv"
    stricter = write_config(tmp_path / "stricter.yaml", dataset={**config["dataset"], "cluster_identity": 0.5})
    result = run_cli("split", "--config", stricter, "--output_dir", tmp_path / "out", "--clusters", tsv)
    error_line(result, "dataset.cluster_identity = 0.3", "gives 0.5", "rerun the cluster stage")
    assert not (tmp_path / "out").exists()

    proteins = [p for name in SPLITS for p in made["splits"][name]]
    lines = tsv.read_text().splitlines()
    dup_row = next(line for line in lines if line.endswith("\tDUP_F"))
    cases = {
        "does not name each protein": "\n".join(lines[:-1]) + "\n",
        "in different clusters": tsv.read_text().replace(dup_row + "\n", "DUP_F\tDUP_F\n"),
        "not a clusters file": "cluster\tunique_id\n",
    }
    for needle, text in cases.items():
        edited = tmp_path / "edited.tsv"
        edited.write_text(text)
        with pytest.raises(PipelineError, match=needle):
            read_clusters(edited, settings_for(config), proteins)

    data_file = Path(config["dataset"]["dataset_location"])
    moved = tmp_path / "data.csv"
    moved.write_text(data_file.read_text().rstrip("\n") + "A\n")  # other data: one residue more
    other = write_config(tmp_path / "other.yaml", dataset={**config["dataset"], "dataset_location": str(moved)})
    result = run_cli("split", "--config", other, "--output_dir", tmp_path / "out", "--clusters", tsv)
    error_line(result, "dataset.dataset_location", "rerun the cluster stage")


def test_stage_settings_change_only_with_data_and_clustering_keys(data):
    config = load_config(data["config"])

    def changed(key: str, value) -> set[str]:
        other = copy.deepcopy(config)
        other["dataset"][key] = value
        return {stage for stage in (CLUSTER, SPLIT) if stage_settings(settings_for(other), stage) != stage_settings(settings_for(config), stage)}

    assert changed("cluster_identity", 0.5) == {CLUSTER, SPLIT}
    assert changed("cluster_coverage", 0.5) == {CLUSTER, SPLIT}
    assert changed("split_seed", 7) == {SPLIT}
    assert changed("val_size", 5) == {SPLIT}
    assert changed("split_by", "random") == {SPLIT}
    assert changed("max_sequence_length", 64) == set()
    # a random split records what it recorded before split_by existed (no clustering key: they change nothing)
    random = copy.deepcopy(config)
    random["dataset"]["split_by"] = "random"
    assert set(stage_settings(settings_for(random), SPLIT)) == {f"dataset.{k}" for k in (
        "dataset_location", "sequence_column_name", "id_column_name", "val_size", "test_size", "split_seed")}


def snakemake(root: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2",
                             str(split_paths(SPLIT_DIR)["summary"]), *args, "--directory", str(root),
                             "--configfile", str(root / "config.yaml")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def jobs(output: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", output, flags=re.M))


@needs_mmseqs
def test_snakemake_reruns_the_cluster_stage_only_when_its_settings_change(data, tmp_path):
    shutil.copy(data["root"] / "data.csv", tmp_path / "data.csv")
    config = load_config(data["config"])
    config["dataset"]["dataset_location"] = "data.csv"
    write_config(tmp_path / "config.yaml", **config)
    assert jobs(snakemake(tmp_path)) == {"cluster", "split"}
    assert (tmp_path / CLUSTERS_FILE).is_file()
    assert "Nothing to be done" in snakemake(tmp_path, "-n")
    assert jobs(snakemake(tmp_path, "-n", "--config", "dataset={split_seed: 7}")) == {"split"}
    assert jobs(snakemake(tmp_path, "-n", "--config", "dataset={cluster_coverage: 0.5}")) == {"cluster", "split"}


def test_missing_mmseqs_is_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-folder"))  # mmseqs nowhere (looked up when a stage runs)
    for args in (("cluster", "--output", tmp_path / "c.tsv"), ("split", "--output_dir", tmp_path / "split")):
        result = run_cli(args[0], "--config", data["config"], *args[1:])
        error_line(result, "mmseqs (MMseqs2) not found on PATH", "apt-get install mmseqs2")
    assert list(tmp_path.iterdir()) == []
