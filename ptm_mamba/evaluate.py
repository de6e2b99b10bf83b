"""The evaluate stage: how well a trained run's features predict PTM sites, on its test split.

For each PTM type with at least ``evaluate.min_sites`` sites among the test proteins, one
per-residue binary task: the candidates are the residues of the amino acid the PTM modifies
(serine for ``<Phosphoserine>``, :data:`ptm_mamba.tokenizer.PTM_RESIDUE`), the label is whether the
residue carries that PTM. The proteins enter every model unmodified (each PTM token replaced by its
residue, :func:`unmodified`), so no label is in any input. Three feature sets of the same residues:

- ``ptm_mamba``: the run's final hidden states (``best.ckpt``, with ESM-2 features from the run's own
  ESM-2, as ``ptm-mamba predict`` computes them);
- ``esm2``: that ESM-2 alone, the model and layer the checkpoint records (weights other than the
  training's are refused), the paper's baseline;
- ``onehot``: the residues within ``evaluate.window`` of the site, one-hot (a sequence-motif baseline).

Each is scored by a linear probe (:mod:`ptm_mamba.probe`) under cross-validation whose folds never
split a protein, nor a sequence cluster with ``dataset.split_by: cluster``; AUROC and AUPRC of the
out-of-fold scores, with 95% intervals from a bootstrap over the same units. A task larger than
``evaluate.max_candidates`` candidates is cut to whole proteins (clusters) drawn at random.

Outputs (``layout.evaluation_outputs``): ``ptm_sites.tsv`` (a row per task and feature set),
``ptm_sites.json`` (the same, with the run, its ESM-2 and the types left out), ``ptm_sites.png``
(AUROC with its interval per type and feature set) and ``ptm_sites.html`` (the table, for the
report). PTM types with too few sites are listed as skipped; with none left the files say so.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .dataset import Protein
from .errors import PipelineError
from .fileio import read_json
from .settings import EvaluateSettings, Settings
from .tokenizer import PTM_RESIDUE, RESIDUES, PTMTokenizer, residue_rows

FEATURES = ("ptm_mamba", "esm2", "onehot")
TSV_COLUMNS = ("ptm", "residue", "features", "proteins", "candidates", "sites",
               "auroc", "auroc_lo", "auroc_hi", "auprc", "auprc_lo", "auprc_hi")
FEWER_THAN_MIN_SITES = "fewer than min_sites"
_TOKENIZER = PTMTokenizer()
# One-hot alphabet: the residue letters and "-" for a position beyond either end of the protein.
_ONEHOT = {c: i for i, c in enumerate([*RESIDUES, "-"])}


@functools.lru_cache(maxsize=None)
def residues_of(protein: Protein) -> str:
    """The unmodified residue sequence (each PTM token its residue; ``<unk>`` is ``X``)."""
    return _TOKENIZER.residue_sequence(list(protein.tokens))


def unmodified(protein: Protein) -> Protein:
    """The protein as every model reads it here: residues only, no PTM token."""
    residues = residues_of(protein)
    return Protein(protein.id, residues, tuple(residues))


def candidates(protein: Protein, ptm: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions (0-based) of the residues ``ptm`` modifies, and whether each carries ``ptm``."""
    codes = np.frombuffer(residues_of(protein).encode("ascii"), dtype=np.uint8)
    positions = np.flatnonzero(codes == ord(PTM_RESIDUE[ptm]))
    labels = np.array([protein.tokens[i] == ptm for i in positions], dtype=bool)
    return positions, labels


@dataclass(frozen=True)
class Task:
    ptm: str
    residue: str
    proteins: tuple[int, ...]  # indices of the evaluated proteins that take part, in order


def _capped(members: list[int], sizes: dict[int, int], groups: list[str], cap: int | None,
            rng: np.random.Generator) -> list[int]:
    """``members`` whole groups at a time, drawn at random, while their candidates fit under ``cap``."""
    if cap is None or sum(sizes[i] for i in members) <= cap:
        return members
    by_group: dict[str, list[int]] = {}
    for i in members:
        by_group.setdefault(groups[i], []).append(i)
    names = sorted(by_group)
    kept, total = [], 0
    for g in rng.permutation(len(names)):
        size = sum(sizes[i] for i in by_group[names[g]])
        if total + size <= cap:
            kept += by_group[names[g]]
            total += size
    return sorted(kept)


def plan_tasks(proteins: list[Protein], groups: list[str], settings: EvaluateSettings) -> tuple[list[Task], list[dict]]:
    """The tasks (PTM types with enough sites, most sites first) and the types left out, with why."""
    counts = Counter(t for p in proteins for t in p.tokens if t in PTM_RESIDUE)
    tasks, skipped = [], []
    for ptm, sites in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if sites < settings.min_sites:
            skipped.append({"ptm": ptm, "sites": sites, "why": FEWER_THAN_MIN_SITES})
            continue
        labels = {i: candidates(p, ptm)[1] for i, p in enumerate(proteins)}
        members = [i for i, y in labels.items() if y.size]
        rng = np.random.default_rng([settings.seed, _TOKENIZER.token_to_id[ptm]])
        members = _capped(members, {i: labels[i].size for i in members}, groups, settings.max_candidates, rng)
        kept = sum(int(labels[i].sum()) for i in members)
        negatives = sum(int((~labels[i]).sum()) for i in members)
        with_sites = {groups[i] for i in members if labels[i].any()}
        why = (f"{FEWER_THAN_MIN_SITES} within max_candidates ({kept} sites)" if kept < settings.min_sites
               else "every candidate residue carries it" if negatives == 0
               else "its sites are all in one protein (or cluster)" if len(with_sites) < 2 else None)
        if why:
            skipped.append({"ptm": ptm, "sites": sites, "why": why})
        else:
            tasks.append(Task(ptm, PTM_RESIDUE[ptm], tuple(members)))
    return tasks, skipped


# ----------------------------------------------------------------------------- features
def _by_letter(residues: str, rows: np.ndarray, letters: set[str]) -> dict[str, np.ndarray]:
    """A protein's per-residue rows (L, d), split by residue letter (only ``letters``), float32."""
    codes = np.frombuffer(residues.encode("ascii"), dtype=np.uint8)
    return {c: np.asarray(rows[codes == ord(c)], dtype=np.float32) for c in letters}


def ptm_mamba_features(trained, proteins: list[Protein], letters: set[str], esm_model,
                       max_tokens_per_batch: int | None, progress: bool) -> list[dict[str, np.ndarray]]:
    """Per protein, residue letter -> the model's final hidden states at those residues of the unmodified
    protein (ESM-2 features from ``esm_model`` where the model uses them)."""
    from .predict import predict_batches

    inputs = [unmodified(p) for p in proteins]
    out: list = [None] * len(inputs)
    esm_model = esm_model if trained.model.config.use_esm else None
    for indices, _, hidden, _ in predict_batches(trained.model, inputs, esm_model, max_tokens_per_batch,
                                                 progress=progress):
        for row, i in enumerate(indices):
            states = hidden[row, residue_rows(inputs[i].length)].float().cpu().numpy()
            out[i] = _by_letter(inputs[i].sequence, states, letters)
    return out


def esm_features(esm_model, proteins: list[Protein], letters: set[str], *, window: int | None,
                 overlap: int | None, max_tokens_per_batch: int | None, progress: bool) -> list[dict[str, np.ndarray]]:
    """Per protein, residue letter -> ESM-2's features (the model's ``repr_layer``) at those residues."""
    from .esm import embed

    residues = [residues_of(p) for p in proteins]
    out: list = [None] * len(proteins)
    items = ((i, r, None) for i, r in enumerate(residues))
    for i, rows in embed(esm_model, items, max_tokens_per_batch=max_tokens_per_batch, window=window,
                         overlap=overlap, progress=progress):
        out[i] = _by_letter(residues[i], rows[residue_rows(len(residues[i]))], letters)
    return out


def onehot_features(residues: str, positions: np.ndarray, window: int) -> np.ndarray:
    """(n, (2 window + 1) x 26) float32: the residues from ``window`` before to ``window`` after each
    position, one-hot, "-" beyond the ends."""
    padded = "-" * window + residues + "-" * window
    codes = np.array([_ONEHOT[c] for c in padded], dtype=np.int64)
    picked = codes[np.asarray(positions)[:, None] + np.arange(2 * window + 1)]
    return np.eye(len(_ONEHOT), dtype=np.float32)[picked].reshape(len(positions), -1)


# ----------------------------------------------------------------------------- the probes
def _score(task: Task, proteins, groups, features, settings: EvaluateSettings) -> dict:
    from .probe import auroc_auprc, bootstrap_ci, group_folds, out_of_fold_scores

    parts = [candidates(proteins[i], task.ptm) for i in task.proteins]
    y = np.concatenate([labels for _, labels in parts])
    g = np.concatenate([[groups[i]] * len(pos) for i, (pos, _) in zip(task.proteins, parts)])
    X = {"ptm_mamba": np.concatenate([features["ptm_mamba"][i][task.residue] for i in task.proteins]),
         "esm2": np.concatenate([features["esm2"][i][task.residue] for i in task.proteins]),
         "onehot": np.concatenate([onehot_features(residues_of(proteins[i]), pos, settings.window)
                                   for i, (pos, _) in zip(task.proteins, parts)])}
    folds = group_folds(y, g, settings.folds, settings.seed)
    scores = {name: out_of_fold_scores(X[name], y, folds, settings.seed) for name in FEATURES}
    cis = bootstrap_ci(y, scores, g, settings.bootstrap, settings.seed)
    metrics = {}
    for name in FEATURES:
        auroc, auprc = auroc_auprc(y, scores[name])
        metrics[name] = {"auroc": float(auroc), "auroc_ci": _pair(cis[name]["auroc"]),
                         "auprc": float(auprc), "auprc_ci": _pair(cis[name]["auprc"])}
    return {"ptm": task.ptm, "residue": task.residue, "proteins": len(task.proteins), "candidates": int(y.size),
            "sites": int(y.sum()), "folds": len(folds), "features": metrics}


def _pair(ci) -> list[float] | None:
    return None if ci is None else [ci[0], ci[1]]


def evaluate_proteins(trained, proteins: list[Protein], groups: list[str], settings: EvaluateSettings, *,
                      esm_model=None, max_tokens_per_batch: int | None = None,
                      esm_max_tokens_per_batch: int | None = None, progress: bool = False) -> dict:
    """The tasks' results on ``proteins`` (``groups[i]``: protein i's protein or cluster id) with the
    trained model of :func:`ptm_mamba.checkpoint.load_model`: ``{"folds", "bootstrap", "tasks", "skipped"}``.
    ``esm_model``: the run's ESM-2, loaded (and checked) here when None. Batch budgets: None takes the
    schema's ``predict.max_tokens_per_batch`` and ``embedding.max_tokens_per_batch``."""
    tasks, skipped = plan_tasks(proteins, groups, settings)
    results = []
    if tasks:
        from .predict import load_trained_esm

        if esm_model is None:
            if trained.esm is None:
                raise PipelineError("the checkpoint records no ESM-2 model: no esm2 baseline can be computed")
            esm_model = load_trained_esm(trained.esm, trained.trained_esm, next(trained.model.parameters()).device)
        used = sorted({i for t in tasks for i in t.proteins})
        letters = {t.residue for t in tasks}
        subset = [proteins[i] for i in used]
        # ESM-2 alone reads long proteins in the windows the run's embed stage used (default: the schema's)
        windows = (trained.settings.embedding.window, trained.settings.embedding.overlap) \
            if trained.settings is not None else (None, None)
        hidden = ptm_mamba_features(trained, subset, letters, esm_model, max_tokens_per_batch, progress)
        esm2 = esm_features(esm_model, subset, letters, window=windows[0], overlap=windows[1],
                            max_tokens_per_batch=esm_max_tokens_per_batch, progress=progress)
        features = {"ptm_mamba": dict(zip(used, hidden)), "esm2": dict(zip(used, esm2))}
        for task in tqdm(tasks, desc="probes", unit="task", disable=not progress):
            results.append(_score(task, proteins, groups, features, settings))
            tqdm.write(summary_line(results[-1]))
    return {"folds": settings.folds, "bootstrap": settings.bootstrap, "tasks": results, "skipped": skipped}


def summary_line(task: dict) -> str:
    scores = ", ".join(f"{name} {_num(m['auroc'])}" + (f" [{_num(m['auroc_ci'][0])}, {_num(m['auroc_ci'][1])}]"
                                                        if m["auroc_ci"] else "")
                       for name, m in task["features"].items())
    return (f"{task['ptm']} ({task['residue']}): {task['proteins']} proteins, {task['candidates']} candidates, "
            f"{task['sites']} sites; AUROC {scores}")


def _num(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.3f}"


# ----------------------------------------------------------------------------- the stage
def fold_groups(proteins: list[Protein], settings: Settings, clusters_file: str | os.PathLike | None) -> list[str]:
    """The unit of each test protein that folds and bootstrap never split: its cluster with
    ``dataset.split_by: cluster`` (the cluster stage's file, checked), else the protein itself."""
    if not settings.dataset.by_cluster:
        return [p.id for p in proteins]
    if clusters_file is None:
        raise PipelineError("dataset.split_by: cluster: give --clusters, the cluster stage's clusters.tsv "
                            "(proteins of one cluster stay in one fold)")
    from .cluster import read_clusters
    from .dataset import read_configured

    clusters = read_clusters(clusters_file, settings, read_configured(settings.dataset))
    return [clusters[p.id] for p in proteins]


def check_run_split(run_folder: Path, proteins: list[Protein], split_dir) -> None:
    """Refuse test proteins the run did not hold out: each must be in its split_mapping.json's test split."""
    from .layout import SPLIT_MAPPING

    path = run_folder / SPLIT_MAPPING
    mapping = read_json(path, "is the run finished?")
    if not isinstance(mapping, dict):
        raise PipelineError(f"{path}: not the split stage's mapping of ids to splits")
    for p in proteins:
        if mapping.get(p.id) != "test":
            where = f"in its {mapping[p.id]} split" if p.id in mapping else "not in its split"
            raise PipelineError(f"{split_dir}: test protein {p.id!r} is {where} ({path}): the run was trained on "
                                "another split; evaluate it with its own split folder")


def run_evaluate(settings: Settings, run_name: str, split_dir: str | os.PathLike, output_dir: str | os.PathLike,
                 clusters_file: str | os.PathLike | None = None, device: str | None = None,
                 progress: bool = True) -> dict:
    """The evaluate stage: the run's ``best.ckpt`` on the test split of ``split_dir``, written into
    ``output_dir`` (:func:`ptm_mamba.layout.evaluation_outputs`); returns the JSON record."""
    from .checkpoint import load_model
    from .device import choose_device, describe, summary
    from .layout import BEST_CKPT, evaluation_outputs, run_dir
    from .split import load_split_dir
    from .stages import EVALUATE, stage_settings

    folder = run_dir(settings.training.output_dir, run_name)
    checkpoint = folder / BEST_CKPT
    proteins = load_split_dir(split_dir, settings)["test"]
    check_run_split(folder, proteins, split_dir)
    groups = fold_groups(proteins, settings, clusters_file)
    device = choose_device(device or settings.device, [], "evaluate", cpu_option="use --device cpu")
    trained = load_model(checkpoint, device=device)
    print(f"evaluate runs on {summary(describe(device))}: {len(proteins)} test proteins of {split_dir}", flush=True)
    result = evaluate_proteins(trained, proteins, groups, settings.evaluate,
                               max_tokens_per_batch=settings.predict.max_tokens_per_batch,
                               esm_max_tokens_per_batch=settings.embedding.max_tokens_per_batch, progress=progress)
    esm = trained.esm
    record = {"run_name": run_name, "checkpoint": str(checkpoint),
              "esm": {"model": esm.model if esm else None, "repr_layer": esm.repr_layer if esm else None},
              **result, "grouped_by": "cluster" if settings.dataset.by_cluster else "protein",
              "settings": stage_settings(settings, EVALUATE)}
    write_outputs(record, evaluation_outputs(output_dir))
    return record


def tsv_rows(record: dict) -> list[list]:
    rows = []
    for task in record["tasks"]:
        for name, m in task["features"].items():
            auroc_ci, auprc_ci = m["auroc_ci"] or [None, None], m["auprc_ci"] or [None, None]
            rows.append([task["ptm"], task["residue"], name, task["proteins"], task["candidates"], task["sites"],
                         m["auroc"], *auroc_ci, m["auprc"], *auprc_ci])
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_outputs(record: dict, files: dict[str, Path]) -> None:
    """ptm_sites.tsv, .json, .png and .html, each written atomically."""
    from .fileio import atomic_write_json, atomic_write_text
    from .layout import EVALUATION_FILES, EVALUATION_PAGE
    from .report import plot_ptm_sites, ptm_sites_html

    tsv, js, png = (files[name] for name in EVALUATION_FILES)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(TSV_COLUMNS)
    writer.writerows([_cell(v) for v in row] for row in tsv_rows(record))
    atomic_write_text(tsv, buf.getvalue())
    atomic_write_json(js, record)
    plot_ptm_sites(record, png)
    ptm_sites_html(tsv, record, files[EVALUATION_PAGE])
