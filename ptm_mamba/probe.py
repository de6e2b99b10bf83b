"""Linear probes scored by grouped cross-validation, with bootstrap confidence intervals.

The evaluate stage's statistics, on plain arrays: features ``X`` (n, d), binary labels ``y`` (n,)
and ``groups`` (n,), the unit that must never be split (a protein, or a sequence cluster).

- :func:`group_folds`: stratified K-fold over groups (scikit-learn's ``StratifiedGroupKFold``), so
  no group has samples on both sides of a fold;
- :func:`out_of_fold_scores`: per fold a ``StandardScaler`` + ``LogisticRegression`` pipeline fitted on
  the other folds, scoring the held-out one; every sample gets exactly one out-of-fold score;
- :func:`auroc_auprc`: AUROC and AUPRC (average precision, as ``sklearn.metrics``) of scores, with
  sample weights, for many weight vectors at once;
- :func:`bootstrap_ci`: 95% intervals from resampling whole groups with replacement (a resample's
  weights are how often each group was drawn), the same resamples for every feature set.

Everything is seeded: the same inputs give the same numbers.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np

CI_LEVEL = 0.95
_CHUNK = 64  # bootstrap resamples scored at once


def group_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` index pairs of ``min(folds, number of groups)`` folds; each group's samples lie
    in one test fold only, folds balanced by label where the groups allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = min(folds, len(np.unique(groups)))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 groups, got {k}")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "The least populated class has only n members": fine, we say so in sites
        warnings.simplefilter("ignore", UserWarning)
        return [(train, test) for train, test in cv.split(np.zeros(len(y)), y, groups)]


def make_probe(seed: int):
    """The probe: standardised features, L2-regularised logistic regression weighted for the rare class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000, random_state=seed))


def out_of_fold_scores(X: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                       seed: int) -> np.ndarray:
    """Each sample's score from the probe fitted without its fold. A training part with one class only
    gives its fold that class's constant score (it has nothing to rank by)."""
    from sklearn.exceptions import ConvergenceWarning

    scores = np.full(len(y), np.nan)
    for train, test in folds:
        if np.unique(y[train]).size < 2:
            scores[test] = float(y[train].mean()) if len(train) else 0.5
            continue
        probe = make_probe(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(X[train], y[train])
        scores[test] = probe.decision_function(X[test])
    if np.isnan(scores).any():
        raise ValueError("the folds do not cover every sample")
    return scores


def auroc_auprc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AUPRC of ``scores`` for labels ``y`` under ``weights`` (n,) or (B, n), each (B,) or
    scalar like ``weights``; NaN where a weighting leaves no positive or no negative. Ties count as
    scikit-learn counts them (``roc_auc_score``, ``average_precision_score``), so do integer weights
    as the samples repeated."""
    y = np.asarray(y, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    single = weights is None or np.ndim(weights) == 1
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, dtype=float))
    order = np.argsort(-scores, kind="mergesort")
    ranked = scores[order]
    ends = np.r_[np.flatnonzero(ranked[1:] != ranked[:-1]), len(ranked) - 1]  # the last of each run of ties
    w = w[:, order]
    pos = y[order]
    tp = np.cumsum(w * pos, axis=1)[:, ends]
    fp = np.cumsum(w * ~pos, axis=1)[:, ends]
    P, N = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / P, fp / N
        zero = np.zeros((len(w), 1))
        dfpr = np.diff(np.hstack([zero, fpr]), axis=1)
        auroc = (dfpr * (tpr + np.hstack([zero, tpr[:, :-1]])) / 2).sum(axis=1)
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
        auprc = (np.diff(np.hstack([zero, tpr]), axis=1) * precision).sum(axis=1)
    valid = (P[:, 0] > 0) & (N[:, 0] > 0)
    auroc, auprc = np.where(valid, auroc, np.nan), np.where(valid, auprc, np.nan)
    return (auroc[0], auprc[0]) if single else (auroc, auprc)


def group_weights(groups: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) weights: for each resample, how often each sample's group was drawn when drawing
    as many groups as there are, with replacement."""
    names, index = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))
                       for _ in range(resamples)]) if resamples else np.zeros((0, len(names)), dtype=np.int64)
    return counts[:, index].astype(float)


def bootstrap_ci(y: np.ndarray, scores: Mapping[str, np.ndarray], groups: np.ndarray, resamples: int,
                 seed: int) -> dict[str, dict[str, tuple[float, float] | None]]:
    """Per feature set, ``{"auroc": (lo, hi), "auprc": (lo, hi)}``: the central 95% of the metric over
    ``resamples`` resamples of the groups (the same resamples for every feature set); None without
    resamples, or when no resample had both classes."""
    out: dict[str, dict[str, list[np.ndarray]]] = {name: {"auroc": [], "auprc": []} for name in scores}
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, _CHUNK):
        weights = group_weights(groups, min(_CHUNK, resamples - start), int(rng.integers(2**32)))
        for name, s in scores.items():
            auroc, auprc = auroc_auprc(y, s, weights)
            out[name]["auroc"].append(auroc)
            out[name]["auprc"].append(auprc)
    tail = (1 - CI_LEVEL) / 2 * 100
    result: dict[str, dict[str, tuple[float, float] | None]] = {}
    for name, metrics in out.items():
        result[name] = {}
        for metric, parts in metrics.items():
            values = np.concatenate(parts) if parts else np.zeros(0)
            values = values[~np.isnan(values)]
            result[name][metric] = None if values.size == 0 else \
                (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
    return result
