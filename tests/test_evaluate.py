"""The evaluate stage: PTM-site probes on a tiny trained run (real model, real tiny ESM-2, real
scikit-learn). No label reaches an input, folds keep proteins and clusters whole, the ESM-2 baseline
is the run's own, and `ptm-mamba evaluate` writes its files or refuses in one line."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import error_line, run_cli, write_config
from ptm_mamba import layout
from ptm_mamba.dataset import Protein
from ptm_mamba.errors import PipelineError
from ptm_mamba.evaluate import (FEATURES, FEWER_THAN_MIN_SITES, TSV_COLUMNS, esm_features, evaluate_proteins,
                                residues_of)
from ptm_mamba.probe import auroc_auprc, group_folds, out_of_fold_scores
from ptm_mamba.settings import EsmSettings, EvaluateSettings
from ptm_mamba.tokenizer import PAD_ID, PTMTokenizer, is_ptm, residue_rows

PHOSPHO = "<Phosphoserine>"
PROBES = EvaluateSettings(min_sites=10, folds=4, bootstrap=100, window=3, seed=0, max_candidates=None)


def synthetic(n: int, planted: bool, seed: int = 0) -> list[Protein]:
    """Proteins rich in serine, a third of them phosphorylated: before a proline (``planted``: a motif
    the sequence shows), or at random serines (the labels shuffled across positions: nothing to find)."""
    rng = random.Random(seed)
    proteins = []
    for i in range(n):
        residues = "".join(rng.choice("SSSPPAKLVEGDRT") for _ in range(50))
        if planted:
            sites = {j for j in range(len(residues) - 1) if residues[j] == "S" and residues[j + 1] == "P"}
        else:
            serines = [j for j, r in enumerate(residues) if r == "S"]
            sites = set(rng.sample(serines, len(serines) // 3))
        tokens = tuple(PHOSPHO if j in sites else r for j, r in enumerate(residues))
        proteins.append(Protein(f"syn{i}", "".join(tokens), tokens))
    return proteins


@pytest.fixture(scope="module")
def trained(checkpoint):
    from ptm_mamba.checkpoint import load_model

    return load_model(checkpoint)


def test_auroc_and_auprc_are_scikit_learn_s_and_weights_count_as_repeated_samples():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.2
    scores = np.round(rng.normal(size=400) + y, 1)  # ties
    auroc, auprc = auroc_auprc(y, scores)
    assert auroc == pytest.approx(roc_auc_score(y, scores))
    assert auprc == pytest.approx(average_precision_score(y, scores))
    weights = rng.integers(0, 3, (2, 400)).astype(float)
    aurocs, auprcs = auroc_auprc(y, scores, weights)
    for k in range(2):
        rows = np.repeat(np.arange(400), weights[k].astype(int))
        assert aurocs[k] == pytest.approx(roc_auc_score(y[rows], scores[rows]))
        assert auprcs[k] == pytest.approx(average_precision_score(y[rows], scores[rows]))


def test_folds_never_split_a_protein_or_a_cluster():
    """Folds hold out whole groups. A label shared by a cluster's members, with features that name the
    cluster, is learnt by heart when a cluster's members sit on both sides of a fold (folds by protein),
    and not at all when folds keep clusters whole."""
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(40), 6)  # 40 clusters of 6 residues, 2 per protein
    proteins = np.arange(240) // 2
    y = (rng.random(40) < 0.3)[clusters]
    X = rng.normal(size=(40, 64))[clusters] + 0.05 * rng.normal(size=(240, 64))  # linearly separable clusters
    for groups in (clusters, proteins):
        folds = group_folds(y, groups, 5, seed=0)
        assert sorted(np.concatenate([test for _, test in folds])) == list(range(240))
        for train, test in folds:
            assert not set(groups[train]) & set(groups[test])
    by_protein = auroc_auprc(y, out_of_fold_scores(X, y, group_folds(y, proteins, 5, 0), 0))[0]
    by_cluster = auroc_auprc(y, out_of_fold_scores(X, y, group_folds(y, clusters, 5, 0), 0))[0]
    assert by_protein > 0.95 and abs(by_cluster - 0.5) < 0.15, (by_protein, by_cluster)


def test_no_label_reaches_the_model_and_shuffled_labels_score_at_chance(trained):
    """The model reads each protein without PTM tokens: with the sites at random serines every feature
    set scores at chance (a PTM token in the input would give PTM-Mamba's features an AUROC of 1); a motif
    the sequence shows (S before P) is found."""
    seen: list[torch.Tensor] = []
    hook = trained.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        shuffled = synthetic(40, planted=False)
        result = evaluate_proteins(trained, shuffled, [p.id for p in shuffled], PROBES)
    finally:
        hook.remove()
    fed = torch.cat([ids.flatten() for ids in seen])
    assert fed.numel() and not bool(is_ptm(fed).any())
    fed_rows = {tuple(ids[residue_rows(int((ids != PAD_ID).sum()) - 2)].tolist()) for batch in seen for ids in batch}
    tok = PTMTokenizer()
    assert fed_rows == {tuple(tok.encode(residues_of(p))) for p in shuffled}  # each protein, unmodified

    (task,) = result["tasks"]
    assert task["ptm"] == PHOSPHO and task["residue"] == "S" and task["proteins"] == 40
    assert task["sites"] == sum(p.num_ptms for p in shuffled)
    for name in FEATURES:
        assert abs(task["features"][name]["auroc"] - 0.5) < 0.12, (name, task["features"][name])

    planted = synthetic(40, planted=True)
    (task,) = evaluate_proteins(trained, planted, [p.id for p in planted], PROBES)["tasks"]
    assert task["features"]["onehot"]["auroc"] > 0.95
    lo, hi = task["features"]["onehot"]["auroc_ci"]
    assert lo <= task["features"]["onehot"]["auroc"] <= hi


def test_the_esm2_baseline_is_the_run_s_esm2_and_other_weights_are_refused(trained, embedded_project, tmp_path):
    from ptm_mamba.esm import embed, load_esm
    from ptm_mamba.predict import load_trained_esm
    from ptm_mamba.testing import write_tiny_esm2_checkpoint

    _, config = embedded_project
    assert trained.esm == EsmSettings(config["esm"]["model"], None)  # the run's own, as recorded
    proteins = synthetic(3, planted=True)
    ours = esm_features(load_trained_esm(trained.esm, trained.trained_esm, "cpu"), proteins, {"S", "P"},
                        window=None, overlap=None, max_tokens_per_batch=4096, progress=False)
    reference = load_esm(config["esm"]["model"], None)
    for p, rows in zip(proteins, ours):
        residues = residues_of(p)
        (_, full), = embed(reference, [(p.id, residues, None)], progress=False)
        full = full[residue_rows(len(residues))]
        for letter in ("S", "P"):
            at = np.array([r == letter for r in residues])
            np.testing.assert_array_equal(rows[letter], full[at])

    other = write_tiny_esm2_checkpoint(tmp_path / "esm2_t2_tiny.pt", num_layers=2, embed_dim=16,
                                       attention_heads=2, seed=1)
    swapped = trained._replace(esm=EsmSettings(str(other), None))
    proteins = synthetic(10, planted=True)
    with pytest.raises(PipelineError, match="not the weights this model was trained with"):
        evaluate_proteins(swapped, proteins, [p.id for p in proteins], dataclasses.replace(PROBES, bootstrap=0))


def read_tsv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_the_cli_writes_the_three_files_or_one_line_errors(embedded_project, checkpoint, tmp_path):
    root, config = embedded_project
    run_folder = checkpoint.parent
    args = ["--run_name", run_folder.name.removeprefix(layout.RUN_PREFIX), "--split_dir", root / "split",
            "--no_progress"]
    path = write_config(tmp_path / "c.yaml", **dict(config, evaluate={"min_sites": 4, "folds": 3, "bootstrap": 50}))
    result = run_cli("evaluate", "--config", path, *args, "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    files = layout.evaluation_outputs(tmp_path / "out")
    record = json.loads(files["ptm_sites.json"].read_text())
    rows = read_tsv(files["ptm_sites.tsv"])
    assert record["checkpoint"] == str(checkpoint) and record["esm"] == {"model": config["esm"]["model"],
                                                                          "repr_layer": None}
    assert (record["folds"], record["bootstrap"], record["grouped_by"]) == (3, 50, "protein")
    assert record["tasks"] and list(rows[0]) == list(TSV_COLUMNS)
    assert len(rows) == 3 * len(record["tasks"])
    for row, (task, name) in zip(rows, [(t, n) for t in record["tasks"] for n in FEATURES]):
        m = task["features"][name]
        assert (row["ptm"], row["residue"], row["features"]) == (task["ptm"], task["residue"], name)
        counts = ("proteins", "candidates", "sites")
        assert [int(row[k]) for k in counts] == [task[k] for k in counts]
        for metric in ("auroc", "auprc"):
            assert float(row[metric]) == pytest.approx(m[metric], rel=1e-5)
            ci = [float(row[f"{metric}_lo"]), float(row[f"{metric}_hi"])]
            assert ci == pytest.approx(m[f"{metric}_ci"], rel=1e-5)
    test_sites = sum(int(row["sites"]) for row in rows if row["features"] == "ptm_mamba")
    skipped = sum(s["sites"] for s in record["skipped"])
    with open(root / "split" / "test.csv") as fh:
        assert test_sites + skipped == sum(int(is_ptm(np.array(PTMTokenizer().encode(r["ptm_seq"]))).sum())
                                           for r in csv.DictReader(fh))
    assert files["ptm_sites.png"].read_bytes()[:4] == b"\x89PNG" and "<table>" in files["ptm_sites.html"].read_text()

    # too few sites for any task: still every file, the types listed as skipped
    few = write_config(tmp_path / "few.yaml", **dict(config, evaluate={"min_sites": 1000}))
    assert run_cli("evaluate", "--config", few, *args, "--output_dir", tmp_path / "few").returncode == 0
    record = json.loads((tmp_path / "few" / "ptm_sites.json").read_text())
    assert record["tasks"] == [] and record["skipped"]
    assert all(s["why"] == FEWER_THAN_MIN_SITES for s in record["skipped"])
    assert len(read_tsv(tmp_path / "few" / "ptm_sites.tsv")) == 0 and (tmp_path / "few" / "ptm_sites.png").is_file()

    bad = write_config(tmp_path / "bad.yaml", **dict(config, evaluate={"folds": 1}))
    error_line(run_cli("evaluate", "--config", bad, *args, "--output_dir", tmp_path / "bad"), "evaluate.folds", "1")
    assert not (tmp_path / "bad").exists()

    # a run that trained on some of these test proteins is refused
    elsewhere = tmp_path / "outputs"
    shutil.copytree(run_folder, elsewhere / run_folder.name)
    mapping = elsewhere / run_folder.name / layout.SPLIT_MAPPING
    ids = json.loads(mapping.read_text())
    leaked = next(pid for pid, split in ids.items() if split == "test")
    mapping.write_text(json.dumps(dict(ids, **{leaked: "train"})))
    moved = write_config(tmp_path / "moved.yaml", **dict(config, training=dict(config["training"],
                                                                                output_dir=str(elsewhere))))
    error_line(run_cli("evaluate", "--config", moved, *args, "--output_dir", tmp_path / "moved"), leaked,
               "in its train split")
