"""Figures and tables of a training run, for the Snakemake report and for users.

    plot_metrics(metrics.json, out_dir)     -> {name: PNG path}: loss, accuracy, learning_rate, throughput,
                                               test_ptm_accuracy
    test_results_table(metrics.json, tsv)   overall test metrics and accuracy per PTM type
    split_table(summary.json, tsv)          the split stage's counts per split
    provenance_table(provenance.json, tsv)  data, ESM-2 weights, code, packages and machine of the run
    embedding_stats([*.h5], tsv)            size, ESM model and value statistics of the embedding files
    run_summary(metrics.json, ...)          [(item, value)]: the run at a glance (data, model, steps, losses)
    plot_ptm_sites(record, png)             the evaluate stage's AUROC per PTM type and feature set, with intervals
    ptm_sites_html(tsv, record, html)       its table (ptm_sites.tsv) as a page, with the PTM types left out
    test_results_html / table_html / provenance_html / config_html / summary_html
                                            the tables (and config.yaml) as self-contained HTML pages:
                                            Snakemake's report shows .html items inline, .tsv/.yaml as downloads

``metrics.json`` is the list ``train.py`` writes: a header, one record per training step
(throughput fields null on the CPU), per validation/test batch, and one average per evaluation
(``avg_val_*``/``avg_test_*``). Every part but the file is optional (a run in progress has no
test records): the figures then say so instead of failing, so every output always exists.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import PipelineError, one_line
from .fileio import atomic_path, atomic_write_text
from .layout import REPORT_FIGURES, report_files
from .options import option
from .tokenizer import ROWS_AROUND_RESIDUES

FIGURES = REPORT_FIGURES
DPI = 120
FIGSIZE = (8.0, 4.8)
MAX_PTM_BARS = 40  # the bar chart shows the most frequent types; the TSV holds all
COLORS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green", "ptm": "tab:purple"}


@dataclass
class RunMetrics:
    """metrics.json sorted into its kinds; records of one kind are sorted by step, one per step."""

    header: dict = field(default_factory=dict)
    train: list[dict] = field(default_factory=list)  # per optimiser step
    val: list[dict] = field(default_factory=list)  # avg_val_* per validation
    test: dict | None = None  # avg_test_* (+ test_ptm_acc_by_type), the last one written

    def series(self, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [(r["Step"], r[key]) for r in getattr(self, kind) if r.get(key) is not None]
        steps, values = zip(*rows) if rows else ((), ())
        return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)

    def best_val(self) -> dict | None:
        """The validation that ``best.ckpt`` was saved at (the first lowest avg_val_loss)."""
        return min(self.val, key=lambda r: r["avg_val_loss"], default=None)


def _read_json(path: Path, missing: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: {missing}") from None
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: not valid JSON ({err})") from None


def load_metrics(path: str | Path) -> RunMetrics:
    """Read and sort a metrics.json; a later record for the same step replaces an earlier one."""
    path = Path(path)
    records = _read_json(path, "metrics file not found (has training started?)")
    if not isinstance(records, list):
        raise PipelineError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    out = RunMetrics()
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise PipelineError(f"{path}: record {i} is {type(record).__name__}, expected an object")
        if "split_sizes" in record or "num_parameters" in record:
            out.header = record
            continue
        if not any(k in record for k in ("train_loss", "avg_val_loss", "avg_test_loss")):
            continue  # per-batch validation/test records: the averages are plotted
        if not isinstance(record.get("Step"), (int, float)):
            raise PipelineError(f"{path}: record {i} has no numeric 'Step'")
        if "train_loss" in record:
            train[record["Step"]] = record
        elif "avg_val_loss" in record:
            val[record["Step"]] = record
        else:
            out.test = record
    out.train = [train[s] for s in sorted(train)]
    out.val = [val[s] for s in sorted(val)]
    return out


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (fewer at the start), same length as ``values``."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(0, idx - window)
    return (sums[idx] - sums[lo]) / (idx - lo)


def smoothing_window(num_steps: int) -> int:
    """About 1/25 of the run (3 to 500 steps); under 20 steps 1 (no smoothing)."""
    return 1 if num_steps < 20 else int(np.clip(round(num_steps / 25), 3, 500))


def ptm_name(token: str) -> str:
    """``<Phosphoserine>`` -> ``Phosphoserine``."""
    return token[1:-1] if token.startswith("<") and token.endswith(">") else token


def _figure(height: float = FIGSIZE[1], rows: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (renders with Agg)

    fig = Figure(figsize=(FIGSIZE[0], height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(rows)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _placeholder(ax, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _epoch_lines(ax, m: RunMetrics) -> None:
    """Faint vertical lines where a new epoch starts (only when there are a few)."""
    starts = [r["Step"] - 1 for prev, r in zip(m.train, m.train[1:]) if r.get("Epoch") != prev.get("Epoch")]
    if 0 < len(starts) <= 50:
        for i, s in enumerate(starts):
            ax.axvline(s, color="0.85", lw=0.8, zorder=0, label="epoch start" if i == 0 else None)


def _train_curve(ax, m: RunMetrics, key: str, label: str, color: str) -> None:
    steps, values = m.series("train", key)
    if steps.size == 0:
        return
    window = smoothing_window(steps.size)
    if window > 1:
        ax.plot(steps, values, color=color, alpha=0.25, lw=0.8, label=f"{label} (per step)")
        ax.plot(steps, moving_average(values, window), color=color, lw=1.8,
                label=f"{label} (mean of {window} steps)")
    else:
        ax.plot(steps, values, color=color, lw=1.5, marker=".", label=f"{label} (per step)")


def _val_curve(ax, m: RunMetrics, key: str, label: str, color: str) -> None:
    steps, values = m.series("val", key)
    if steps.size:
        ax.plot(steps, values, color=color, lw=1.8, marker="o", ms=4, label=label)


def _test_line(ax, m: RunMetrics, key: str, label: str, color: str) -> None:
    if m.test is not None and m.test.get(key) is not None:
        value = m.test[key]
        ax.axhline(value, color=color, ls="--", lw=1.3, label=f"{label} = {value:.4f}")


def _best_step_note(m: RunMetrics) -> str:
    best = m.best_val()
    return f"best.ckpt, step {best['Step']}" if best else "best.ckpt"


def plot_loss(m: RunMetrics, path: Path) -> Path:
    fig, ax = _figure()
    params = m.header.get("num_parameters")
    title = "Masked-token cross-entropy loss" + (f" ({params:,} parameters)" if params else "")
    if not m.train and not m.val and m.test is None:
        _placeholder(ax, title, "no training steps recorded yet")
        return _save(fig, path)
    _epoch_lines(ax, m)
    _train_curve(ax, m, "train_loss", "train", COLORS["train"])
    _val_curve(ax, m, "avg_val_loss", "validation", COLORS["val"])
    best = m.best_val()
    if best is not None:
        ax.plot([best["Step"]], [best["avg_val_loss"]], "o", ms=10, mfc="none", mec="black", mew=1.5,
                label=f"lowest validation loss (step {best['Step']})")
    _test_line(ax, m, "avg_test_loss", f"test ({_best_step_note(m)})", COLORS["test"])
    ax.set(title=title, xlabel="optimiser step", ylabel="loss (nats per masked token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_accuracy(m: RunMetrics, path: Path) -> Path:
    fig, ax = _figure()
    title = "Accuracy of masked-token predictions"
    if not m.train and not m.val and m.test is None:
        _placeholder(ax, title, "no training steps recorded yet")
        return _save(fig, path)
    _epoch_lines(ax, m)
    _train_curve(ax, m, "train_acc", "train, all tokens", COLORS["train"])
    _train_curve(ax, m, "train_ptm_acc", "train, PTM tokens", COLORS["ptm"])
    _val_curve(ax, m, "avg_val_acc", "validation, all tokens", COLORS["val"])
    _val_curve(ax, m, "avg_val_ptm_acc", "validation, PTM tokens", "tab:red")
    _test_line(ax, m, "avg_test_acc", "test, all tokens", COLORS["test"])
    _test_line(ax, m, "avg_test_ptm_acc", "test, PTM tokens", "tab:olive")
    ax.set(title=title, xlabel="optimiser step", ylabel="accuracy (fraction of masked tokens)")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_learning_rate(m: RunMetrics, path: Path) -> Path:
    fig, ax = _figure(height=3.6)
    title = "Learning rate (warm-up, then the schedule)"
    steps, lr = m.series("train", "lr")
    if steps.size == 0:
        _placeholder(ax, title, "no training steps recorded yet")
        return _save(fig, path)
    ax.plot(steps, lr, color=COLORS["train"], lw=1.5, marker="." if steps.size <= 50 else None,
            label="learning rate used at the step")
    ax.set(title=title, xlabel="optimiser step", ylabel="learning rate")
    ax.set_ylim(bottom=0.0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_throughput(m: RunMetrics, path: Path) -> Path:
    """Whether training is fed: tokens/s, loader-wait fraction and (GPU) peak memory per step."""
    fig, axes = _figure(height=7.2, rows=3)
    fig.suptitle("Throughput: is the data loader or the model the limit?")
    recorded = m.series("train", "tokens_per_s")[0].size > 0
    missing = "not recorded (a run of an earlier version)" if m.train else "no training steps recorded yet"
    panels = (("tokens_per_s", "tokens/s", "training tokens per second", missing),
              ("loader_wait_fraction", "waiting for data", "fraction of step time\nwaiting for data", missing),
              ("peak_memory_gib", "peak GPU memory", "peak GPU memory (GiB)",
               "trained on the CPU: no GPU memory" if recorded else missing))
    for ax, (key, label, ylabel, note) in zip(axes, panels):
        if m.series("train", key)[0].size == 0:
            _placeholder(ax, label, note)
            continue
        _epoch_lines(ax, m)
        _train_curve(ax, m, key, label, COLORS["train"])
        ax.set(ylabel=ylabel, ylim=(0.0, 1.0) if key == "loader_wait_fraction" else (0.0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("optimiser step")
    return _save(fig, path)


def plot_test_ptm_accuracy(m: RunMetrics, path: Path) -> Path:
    """Horizontal bars: accuracy per PTM type, most frequent type on top, site counts in the labels."""
    by_type = (m.test or {}).get("test_ptm_acc_by_type") or {}
    rows = sorted(by_type.items(), key=lambda kv: (-kv[1]["sites"], kv[0]))
    shown = rows[:MAX_PTM_BARS]
    title = f"Test accuracy per PTM type ({_best_step_note(m)})"
    if len(rows) > len(shown):
        title += f"\n{len(shown)} most frequent of {len(rows)} types; all in test_results.tsv"
    fig, ax = _figure(height=max(3.0, 0.32 * len(shown) + 1.6))
    if not shown:
        message = "no test results yet" if m.test is None else "no PTM sites in the test set"
        _placeholder(ax, title, message)
        return _save(fig, path)
    labels = [f"{ptm_name(t)} (n={v['sites']:,})" for t, v in shown]
    accs = [v["acc"] for _, v in shown]
    y = np.arange(len(shown))
    ax.barh(y, accs, color=COLORS["ptm"], alpha=0.8)
    for yi, acc in zip(y, accs):
        ax.text(acc + 0.01, yi, f"{acc:.2f}", va="center", fontsize=8)
    overall = m.test.get("avg_test_ptm_acc")
    if overall is not None:
        ax.axvline(overall, color="black", ls="--", lw=1, label=f"all PTM sites = {overall:.4f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(title=title, xlabel="accuracy of masked PTM tokens (best.ckpt)", xlim=(0.0, 1.1))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write each of :data:`FIGURES` as PNG into ``out_dir``; a note replaces missing data."""
    m = load_metrics(metrics_path)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    files = report_files(out_dir)
    plots = {"loss": plot_loss, "accuracy": plot_accuracy, "learning_rate": plot_learning_rate,
             "throughput": plot_throughput, "test_ptm_accuracy": plot_test_ptm_accuracy}
    return {name: plots[name](m, files[name]) for name in FIGURES}


def _write_tsv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else _fmt(v) for v in row] for row in rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def test_results_table(metrics_path: str | Path, out_tsv: str | Path) -> Path:
    """Columns ``scope metric sites value``: overall (scope ``all``), then per PTM type, most frequent first."""
    m = load_metrics(metrics_path)
    rows: list[tuple] = []
    if m.test is not None:
        by_type = m.test.get("test_ptm_acc_by_type") or {}
        ptm_sites = sum(v["sites"] for v in by_type.values()) if by_type else None
        best = m.best_val()
        if best is not None:
            rows.append(("all", "best.ckpt step (lowest validation loss)", None, best["Step"]))
            rows.append(("all", "validation loss at best.ckpt", None, best["avg_val_loss"]))
        for key, name, sites in (("avg_test_loss", "loss", None), ("avg_test_perplexity", "perplexity", None),
                                 ("avg_test_acc", "accuracy", None),
                                 ("avg_test_ptm_acc", "PTM accuracy", ptm_sites)):
            if m.test.get(key) is not None:
                rows.append(("all", name, sites, m.test[key]))
        for token, v in sorted(by_type.items(), key=lambda kv: (-kv[1]["sites"], kv[0])):
            rows.append((ptm_name(token), "accuracy", v["sites"], v["acc"]))
    return _write_tsv(out_tsv, ("scope", "metric", "sites", "value"), rows)


SPLIT_COLUMNS = ("sequences", "residues", "ptm_sites", "max_length")
CLUSTER_COLUMNS = ("clusters", "max_identity_to_train")  # only in a split by clusters


def split_table(summary_json: str | Path, out_tsv: str | Path) -> Path:
    """One row per split of the split stage's summary.json, then their total; PTM sites per 100 residues.
    A split by clusters adds the clusters per split and the test set's highest identity to training."""
    path = Path(summary_json)
    summary = _read_json(path, "split summary not found (run the split stage first)")
    summary = summary.get("splits") if isinstance(summary, dict) else None
    if not isinstance(summary, dict) or not all(isinstance(v, dict) for v in summary.values()):
        raise PipelineError(f"{path}: expected {{\"splits\": {{split: {{counts}}}}}}")
    for name, s in summary.items():
        missing = [c for c in SPLIT_COLUMNS if c not in s]
        if missing:
            raise PipelineError(f"{path}: split {name!r} lacks {', '.join(missing)}")

    extra = [c for c in CLUSTER_COLUMNS if any(c in s for s in summary.values())]

    def row(name: str, s: dict, fingerprint) -> tuple:
        per100 = 100.0 * s["ptm_sites"] / s["residues"] if s["residues"] else None
        return (name, *(s[c] for c in SPLIT_COLUMNS), per100, *(s.get(c) for c in extra), fingerprint)

    rows = [row(name, s, s.get("fingerprint")) for name, s in summary.items()]
    if summary:
        total = {c: sum(s[c] for s in summary.values()) for c in SPLIT_COLUMNS}
        total["max_length"] = max(s["max_length"] for s in summary.values())
        if "clusters" in extra:
            total["clusters"] = sum(s.get("clusters", 0) for s in summary.values())
        rows.append(row("total", total, None))
    return _write_tsv(out_tsv, ("split", *SPLIT_COLUMNS, "ptm_sites_per_100_residues", *extra, "fingerprint"), rows)


def provenance_table(provenance_json: str | Path, out_tsv: str | Path) -> Path:
    """provenance.json as ``item value`` rows, nested keys joined with dots."""
    path = Path(provenance_json)
    if not path.exists():
        return _write_tsv(out_tsv, ("item", "value"), [("provenance", f"not recorded ({path.name} not found)")])
    record = _read_json(path, "not found")
    if not isinstance(record, dict):
        raise PipelineError(f"{path}: expected a JSON object")

    def flat(prefix: str, value) -> list[tuple[str, object]]:
        if isinstance(value, dict) and value:
            return [item for k, v in value.items() for item in flat(f"{prefix}.{k}" if prefix else k, v)]
        if isinstance(value, list):
            return [(prefix, ", ".join(map(str, value)) or "none")]
        return [(prefix, "" if value is None else value)]

    return _write_tsv(out_tsv, ("item", "value"), flat("", record))


EMBEDDING_COLUMNS = ("split", "proteins", "residues", "dim", "replicates", "esm_model", "repr_layer", "shards",
                     "sampled_residues", "mean", "std", "masked_fraction", "file")


def _sample_rows(total: int, budget: int, blocks: int = 16) -> list[slice]:
    """Up to ``budget`` rows of ``total``: all of them, or ``blocks`` contiguous runs spread evenly."""
    if total <= budget:
        return [slice(0, total)] if total else []
    size = max(1, budget // blocks)
    starts = np.linspace(0, total - size, num=min(blocks, max(1, budget // size))).astype(int)
    return [slice(int(s), int(s) + size) for s in starts]


def embedding_stats(h5_paths: Sequence[str | Path], out_tsv: str | Path, max_values: int = 4_000_000) -> Path:
    """One row per embedding file; value statistics from a bounded sample of replicate 0, so the
    cost does not grow with the file."""
    import h5py

    from .embedding_store import EmbeddingReader

    rows = []
    for path in map(Path, h5_paths):
        with EmbeddingReader(path) as reader:
            ids, attrs = reader.ids, reader.attrs  # validates the layout, raises PipelineError if broken
        with h5py.File(path, "r", locking=False) as f:  # layout documented in embedding_store
            emb, mask, offsets = f["embeddings/0"], f["masks/0"], f["offsets"][()]
            scales = f["scales/0"] if "scales/0" in f else None  # an int8 store: row r is emb[r] * scales[r]
            total, dim = int(emb.shape[0]), int(emb.shape[1])
            residues = total - ROWS_AROUND_RESIDUES * len(ids)  # each protein's <cls> and <eos> rows
            picked = _sample_rows(total, max(1, max_values // max(1, dim)))
            at_residue = [~np.isin(np.arange(s.start, s.stop), np.concatenate([offsets[:-1], offsets[1:] - 1]))
                          for s in picked]
            values = [(emb[s] if scales is None else emb[s] * scales[s][:, None].astype(np.float64))[keep]
                      .astype(np.float64) for s, keep in zip(picked, at_residue)]
            masked = [mask[s][keep] for s, keep in zip(picked, at_residue)]
        sample = np.concatenate(values) if values else np.zeros((0, dim))
        flags = np.concatenate(masked) if masked else np.zeros(0, dtype=bool)
        rows.append((attrs.get("split", path.stem), len(ids), residues, dim, attrs.get("mask_replicates"),
                     attrs.get("esm_model"), attrs.get("repr_layer"), attrs.get("num_shards"), sample.shape[0],
                     float(sample.mean()) if sample.size else None, float(sample.std()) if sample.size else None,
                     float(flags.mean()) if flags.size else None, str(path)))
    return _write_tsv(out_tsv, EMBEDDING_COLUMNS, rows)


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: config not found") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({one_line(err, limit=1000)})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    return data


def _num(v, digits: int = 4) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return "nan" if math.isnan(v) else f"{v:.{digits}g}"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _when(created) -> str:
    import datetime as dt

    try:
        t = dt.datetime.fromisoformat(str(created))
    except ValueError:
        return str(created)
    offset = t.utcoffset()
    return t.strftime("%Y-%m-%d %H:%M") + ("" if offset is None else " UTC" if not offset else t.strftime(" %z"))


def run_summary(metrics_path: str | Path, summary_json: str | Path | None = None,
                config_yaml: str | Path | None = None,
                provenance_json: str | Path | None = None) -> list[tuple[str, str]]:
    """The run at a glance, as a dozen ``(item, value)`` rows for the report's front page.
    Only ``metrics.json`` is needed; what an unfinished run lacks is said in words."""
    m = load_metrics(metrics_path)
    config = _read_yaml(Path(config_yaml)) if config_yaml else {}
    split_summary = _read_json(Path(summary_json), "split summary not found") if summary_json else None
    splits = split_summary.get("splits") if isinstance(split_summary, dict) else None
    provenance = {}
    if provenance_json and Path(provenance_json).exists():  # a run of an earlier version has none
        provenance = _read_json(Path(provenance_json), "not found")
        provenance = provenance if isinstance(provenance, dict) else {}

    def section(name: str) -> dict:
        return config[name] if isinstance(config.get(name), dict) else {}

    dataset, esm, model, training = section("dataset"), section("esm"), section("model"), section("training")

    rows: list[tuple[str, str]] = []
    if config.get("run_name"):
        rows.append(("run", str(config["run_name"])))
    if provenance.get("created"):
        gpus, device = provenance.get("gpus") or [], (provenance.get("runtime") or {}).get("device")
        counts: dict[str, int] = {}
        for name in map(str, gpus):
            counts[name] = counts.get(name, 0) + 1
        where = ", ".join(f"{n} × {name}" if n > 1 else name for name, n in counts.items()) if gpus else (
            "CPU" if device in (None, "cpu") else str(device))
        procs = provenance.get("processes")
        rows.append(("trained", f"{_when(provenance['created'])} on {provenance.get('host') or '?'} ({where}"
                     + (f", {procs} processes" if isinstance(procs, int) and procs > 1 else "") + ")"))
    data = dataset.get("dataset_location") or (provenance.get("dataset") or {}).get("path")
    if data:
        n_rows = (provenance.get("dataset") or {}).get("rows")
        how = {"random": "at random", "cluster": f"by MMseqs2 clusters at {dataset.get('cluster_identity')} "
                                                 "identity"}.get(dataset.get("split_by"))
        rows.append(("dataset", str(data) + (f" ({_plural(n_rows, 'row')})" if isinstance(n_rows, int) else "")
                     + (f", split {how}" if how else "")))
    if isinstance(splits, dict) and splits and all(isinstance(v, dict) for v in splits.values()):
        names = [n for n in ("train", "val", "test") if n in splits] or list(splits)
        for key, label in (("sequences", "proteins"), ("ptm_sites", "PTM sites")):
            if all(key in splits[n] for n in names):
                rows.append((f"{label} ({' / '.join(names)})", " / ".join(_num(splits[n][key]) for n in names)))
    elif isinstance(m.header.get("split_sizes"), dict):
        sizes = m.header["split_sizes"]
        rows.append((f"proteins ({' / '.join(sizes)})", " / ".join(_num(v) for v in sizes.values())))
    if esm.get("model"):
        rows.append(("ESM-2 model", str(esm["model"]) + ("" if training.get("use_esm", True) else " (not used)")))
    layers, params = model.get("n_layer"), m.header.get("num_parameters")
    described = [model.get("model_type"), f"d_model {model['d_model']}" if "d_model" in model else None,
                 _plural(layers, "layer") if isinstance(layers, int) else None,
                 f"{_num(params)} parameters" if isinstance(params, int) else None]
    if any(described):
        rows.append(("model", ", ".join(str(x) for x in described if x)))
    if m.train:
        last, limit = m.train[-1], training.get("max_steps")
        rows.append(("optimiser steps", _num(last["Step"]) + (f" of max_steps {_num(limit)}" if limit else "")
                     + f" ({_plural(int(last.get('Epoch', 0)) + 1, 'epoch')})"))
    else:
        rows.append(("optimiser steps", "none recorded yet"))
    if m.val:
        last, best = m.val[-1], m.best_val()
        lowest = f"{_num(best['avg_val_loss'])} at step {best['Step']} (the lowest: best.ckpt)"
        rows.append(("validation loss", lowest if best is last else
                     f"{_num(last['avg_val_loss'])} at the last validation (step {last['Step']}); {lowest}"))
    else:
        rows.append(("validation loss", "no validation yet"))
    if m.test is None:
        rows.append(("test", "not scored yet (training scores the test set with best.ckpt when it ends)"))
        return rows
    by_type = m.test.get("test_ptm_acc_by_type") or {}
    if m.test.get("avg_test_loss") is not None:
        perplexity = m.test.get("avg_test_perplexity")
        rows.append(("test loss", f"{_num(m.test['avg_test_loss'])}"
                     + (f" (perplexity {_num(perplexity)})" if perplexity is not None else "") + " with best.ckpt"))
    if m.test.get("avg_test_acc") is not None:
        rows.append(("test accuracy", f"{_num(m.test['avg_test_acc'])} of all masked tokens"))
    if m.test.get("avg_test_ptm_acc") is not None:
        sites = sum(v["sites"] for v in by_type.values())
        of = f" of {_plural(sites, 'masked PTM site')} ({_plural(len(by_type), 'type')})" if by_type else ""
        rows.append(("test PTM accuracy", f"{_num(m.test['avg_test_ptm_acc'])}{of}"))
    else:
        rows.append(("test PTM accuracy", "no PTM sites in the test set"))
    return rows


# Snakemake's report shows .html inline but .tsv/.yaml as downloads: hence self-contained pages.
PAGE_CSS = """
body { font-family: ui-sans-serif, system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       "Noto Sans", "DejaVu Sans", sans-serif; color: #1e293b; margin: 0; padding: 1.25rem 1.5rem 3rem;
       font-size: 14px; line-height: 1.45; background: #fff; }
h1 { font-size: 1.3rem; margin: 0 0 0.35rem; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 0.4rem; }
p.note { color: #475569; margin: 0 0 0.9rem; max-width: 60rem; }
table { border-collapse: collapse; margin: 0.25rem 0 0.5rem; }
th, td { border-bottom: 1px solid #e2e8f0; padding: 0.3rem 0.9rem 0.3rem 0.5rem; text-align: left;
         vertical-align: baseline; }
thead th { background: #f1f5f9; border-bottom: 2px solid #cbd5e1; font-weight: 600; position: sticky; top: 0; }
tbody tr:nth-child(even) td { background: #f8fafc; }
tbody tr:hover td { background: #ecfdf5; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
td.key { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
         font-size: 0.9em; white-space: nowrap; }
td.label { color: #475569; white-space: nowrap; }
td.wrap { min-width: 16rem; overflow-wrap: anywhere; }
tr.total td { font-weight: 600; border-top: 2px solid #cbd5e1; }
tr.section td { background: #e2e8f0 !important; font-weight: 600; }
td.bar { width: 12rem; padding-right: 0.5rem; }
td.bar div { height: 0.8rem; background: #8b5cf6; opacity: 0.8; border-radius: 2px; }
pre { background: #f8fafc; border: 1px solid #e2e8f0; border-radius: 6px; padding: 0.8rem 1rem;
      font-size: 13px; line-height: 1.4; overflow-x: auto; }
pre .k { color: #0f766e; font-weight: 600; }
pre .c { color: #64748b; }
"""


def _esc(value) -> str:
    import html

    return html.escape("" if value is None else str(value))


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _words(name: str) -> str:
    return name.replace("_", " ")


def html_page(title: str, body: str) -> str:
    """A complete HTML document with the report's table style."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_esc(title)}</title>\n'
            f"<style>{PAGE_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def html_table(header: Sequence[str] | None, rows: Sequence[Sequence], key_columns: Sequence[int] = (),
               wrap_columns: Sequence[int] = (), label_columns: Sequence[int] = (), row_class=None,
               extra=None, numeric_rows: bool = False) -> str:
    """An HTML table of the cells as they are; all-number columns are right-aligned (``numeric_rows``:
    per row instead). ``row_class(row)`` may name a CSS class (``total``, ``section``); ``extra(row)``
    adds raw HTML cells."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    classes = [row_class(row) if row_class else None for row in rows]
    width = len(header) if header else max((len(r) for r in rows), default=0)
    cells = [[r[i] for r, c in zip(rows, classes) if c != "section" and i < len(r) and r[i]] for i in range(width)]
    numeric = [not numeric_rows and bool(col) and all(_is_number(c) for c in col) for col in cells]

    def attrs(i: int, row: list[str]) -> str:
        num = numeric[i] or (numeric_rows and i > 0 and all(_is_number(c) for c in row[1:] if c))
        names = [n for n, on in (("num", num), ("key", i in key_columns), ("label", i in label_columns),
                                 ("wrap", i in wrap_columns)) if on]
        return f' class="{" ".join(names)}"' if names else ""

    lines = ["<table>"]
    if header:
        num = ' class="num"'
        th = "".join(f"<th{num if numeric[i] else ''}>{_esc(_words(h))}</th>" for i, h in enumerate(header))
        lines.append(f"<thead><tr>{th}{'<th></th>' if extra else ''}</tr></thead>")
    lines.append("<tbody>")
    for row, klass in zip(rows, classes):
        tr = f'<tr class="{klass}">' if klass else "<tr>"
        if klass == "section":
            lines.append(f'{tr}<td colspan="{width + bool(extra)}">{_esc(row[0])}</td></tr>')
            continue
        tds = "".join(f"<td{attrs(i, row)}>{_esc(v)}</td>" for i, v in enumerate(row))
        lines.append(f"{tr}{tds}{extra(row) if extra else ''}</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _read_tsv_rows(path: str | Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    if not rows:
        raise PipelineError(f"{path}: empty table (no header)")
    return rows[0], rows[1:]


def _write_page(path: str | Path, title: str, body: str) -> Path:
    atomic_write_text(path, html_page(title, body))
    return Path(path)


def _heading(title: str, note: str = "") -> str:
    return f"<h1>{_esc(title)}</h1>\n" + (f'<p class="note">{_esc(note)}</p>\n' if note else "")


def summary_html(rows: Sequence[tuple[str, str]], out_html: str | Path) -> Path:
    """The :func:`run_summary` rows as a page."""
    run = dict(rows).get("run")
    title = f"Run {run} at a glance" if run else "The run at a glance"
    note = ("What was trained on what, and how it did. The test results are those of best.ckpt, the checkpoint "
            "with the lowest validation loss; the curves, the tables and the settings are in the other categories.")
    return _write_page(out_html, title, _heading(title, note) + html_table(None, rows, label_columns=(0,)))


def test_results_html(tsv: str | Path, out_html: str | Path) -> Path:
    """test_results.tsv as a page: the overall metrics, then the accuracy per PTM type with a bar each."""
    header, rows = _read_tsv_rows(tsv)
    title = "Test results of best.ckpt"
    if not rows:
        note = "No test results yet: the test set is scored with best.ckpt when training ends."
        return _write_page(out_html, title, _heading(title, note))
    col = {name: i for i, name in enumerate(header)}
    pick = lambda r, *names: [r[col[n]] for n in names]  # noqa: E731
    overall = [pick(r, "metric", "sites", "value") for r in rows if r[col["scope"]] == "all"]
    per_type = [pick(r, "scope", "sites", "value") for r in rows if r[col["scope"]] != "all"]

    def bar(row) -> str:
        width = max(0.0, min(1.0, float(row[2]))) * 100 if _is_number(row[2]) else 0.0
        return f'<td class="bar"><div style="width:{width:.1f}%"></div></td>'

    body = _heading(title, "Masked-token prediction on the test set, scored with the checkpoint of the lowest "
                           "validation loss (the same table is in test_results.tsv).")
    body += "<h2>All masked tokens</h2>\n" + html_table(("metric", "sites", "value"), overall)
    if per_type:
        body += (f"\n<h2>Accuracy per PTM type ({_plural(len(per_type), 'type')}, most frequent first)</h2>\n"
                 '<p class="note">The fraction of masked sites of each type predicted correctly; types with few '
                 "sites give noisy accuracies.</p>\n"
                 + html_table(("PTM type", "sites", "accuracy"), per_type, extra=bar))
    return _write_page(out_html, title, body)


def table_html(tsv: str | Path, out_html: str | Path, title: str, note: str = "",
               wrap_columns: Sequence[int] = ()) -> Path:
    """Any of the run's TSV tables as a page; a row named ``total`` is set in bold."""
    header, rows = _read_tsv_rows(tsv)
    body = _heading(title, note)
    if rows:
        body += html_table(header, rows, wrap_columns=wrap_columns,
                           row_class=lambda r: "total" if r and r[0] == "total" else None)
    else:
        body += '<p class="note">(no rows)</p>'
    return _write_page(out_html, title, body)


EMBEDDINGS_TITLE = "Precomputed ESM-2 embeddings"
EMBEDDINGS_NOTE = ("Size and settings of each embedding file, and the mean, standard deviation and masked "
                   "fraction of a sample of its replicate 0 (the same table, a row per file, is in embeddings.tsv).")


def embeddings_html(tsv: str | Path, out_html: str | Path) -> Path:
    """embeddings.tsv as a page: a column per embedding file (a row per file when there are many)."""
    header, rows = _read_tsv_rows(tsv)
    if not 0 < len(rows) <= 8:
        return table_html(tsv, out_html, EMBEDDINGS_TITLE, EMBEDDINGS_NOTE, wrap_columns=(len(header) - 1,))
    fields = [(_words(name), *(r[i] for r in rows)) for i, name in enumerate(header) if i > 0]
    table = html_table(("", *(r[0] for r in rows)), fields, label_columns=(0,), numeric_rows=True,
                       wrap_columns=tuple(range(1, len(rows) + 1)))
    return _write_page(out_html, EMBEDDINGS_TITLE, _heading(EMBEDDINGS_TITLE, EMBEDDINGS_NOTE) + table)


def provenance_html(tsv: str | Path, out_html: str | Path) -> Path:
    """provenance.tsv as a page: dotted items under a heading row of their first part (of two for
    ``settings.<stage>``)."""
    header, rows = _read_tsv_rows(tsv)
    grouped: list[tuple[str, ...]] = []  # a heading row is one cell
    current = None
    for item, *rest in rows:
        parts = item.split(".")
        depth = 2 if parts[0] == "settings" and len(parts) > 2 else 1
        group = ".".join(parts[:depth]) if len(parts) > depth else None
        if group is not None and group != current:
            grouped.append((group,))
        current = group
        grouped.append((".".join(parts[depth:]) if group else item, *rest))
    title = "Provenance of the run"
    body = _heading(title, "Where this run came from, as training recorded it in provenance.json.")
    body += html_table(header, grouped, key_columns=(0,), wrap_columns=(1,),
                       row_class=lambda r: "section" if len(r) == 1 else None)
    return _write_page(out_html, title, body)


def config_html(config_yaml: str | Path, out_html: str | Path) -> Path:
    """The run's config.yaml as it is, preformatted, keys highlighted."""
    import re

    path = Path(config_yaml)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: config not found") from None
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            lines.append(f'<span class="c">{_esc(line)}</span>')
            continue
        match = re.match(r"^(\s*(?:- )?)([^\s:#'\"][^:#]*?)(:(?:\s|$).*)$", line)
        lines.append(f'{_esc(match[1])}<span class="k">{_esc(match[2])}</span>{_esc(match[3])}' if match else
                     _esc(line))
    title = "Configuration of the run"
    note = (f"{path.name} as training saved it (every key, defaults included); pass it to --configfile to run "
            "the same again.")
    return _write_page(out_html, title, _heading(title, note) + "<pre>" + "\n".join(lines) + "</pre>")


EVALUATION_COLORS = {"ptm_mamba": "tab:purple", "esm2": "tab:blue", "onehot": "tab:gray"}
EVALUATION_LABELS = {"ptm_mamba": "PTM-Mamba", "esm2": "ESM-2", "onehot": "one-hot window"}


def plot_ptm_sites(record: dict, path: str | Path) -> Path:
    """The evaluate stage's record (ptm_sites.json) as a figure: per PTM type (most sites on top) the
    out-of-fold AUROC of each feature set, with its bootstrap 95% interval; 0.5 is chance."""
    tasks = record.get("tasks") or []
    title = f"PTM-site prediction on the test split ({record.get('run_name', '')}): linear probes"
    fig, ax = _figure(height=max(3.0, 0.55 * len(tasks) + 1.8))
    if not tasks:
        reason = "no PTM type has enough sites in the test split\n(evaluate.min_sites)" if record.get("skipped") \
            else "no PTM sites in the test split"
        _placeholder(ax, title, reason)
        return _save(fig, Path(path))
    names = list(tasks[0]["features"])
    step = 0.8 / len(names)
    for k, name in enumerate(names):
        y = np.arange(len(tasks)) - 0.4 + step * (k + 0.5)
        auroc = np.array([t["features"][name]["auroc"] for t in tasks])
        ci = [t["features"][name]["auroc_ci"] or [a, a] for t, a in zip(tasks, auroc)]
        err = np.array([[a - lo for a, (lo, _) in zip(auroc, ci)], [hi - a for a, (_, hi) in zip(auroc, ci)]])
        ax.errorbar(auroc, y, xerr=np.clip(err, 0, None), fmt="o", ms=5, capsize=3,
                    color=EVALUATION_COLORS.get(name), label=EVALUATION_LABELS.get(name, name))
    ax.axvline(0.5, color="0.5", ls="--", lw=1, label="chance")
    labels = [f"{ptm_name(t['ptm'])} ({t['residue']}; {t['sites']:,} of {t['candidates']:,})" for t in tasks]
    ax.set_yticks(np.arange(len(tasks)), labels, fontsize=8)
    ax.invert_yaxis()
    folds = sorted({t.get("folds", record.get("folds")) for t in tasks})  # fewer where there are fewer proteins
    span = str(folds[0]) if len(folds) == 1 else f"{folds[0]}–{folds[-1]}"
    ax.set(title=title, xlabel=f"AUROC, {span}-fold cross-validation (95% bootstrap interval)",
           xlim=(min(0.4, ax.get_xlim()[0]), 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    return _save(fig, Path(path))


def ptm_sites_html(tsv: str | Path, record: dict, out_html: str | Path) -> Path:
    """ptm_sites.tsv as a page: a row per PTM type and feature set, AUROC and AUPRC with their
    intervals; then the PTM types left out and why (from the record, ptm_sites.json)."""
    header, rows = _read_tsv_rows(tsv)
    col = {name: i for i, name in enumerate(header)}

    def with_ci(row: list[str], metric: str) -> str:
        lo, hi = row[col[f"{metric}_lo"]], row[col[f"{metric}_hi"]]
        value = _num(float(row[col[metric]]), 3)
        return f"{value} [{_num(float(lo), 3)}, {_num(float(hi), 3)}]" if lo and hi else value

    shown = [(ptm_name(r[col["ptm"]]), r[col["residue"]], EVALUATION_LABELS.get(r[col["features"]], r[col["features"]]),
              r[col["proteins"]], r[col["candidates"]], r[col["sites"]], with_ci(r, "auroc"), with_ci(r, "auprc"))
             for r in rows]
    unit = "clusters" if record.get("grouped_by") == "cluster" else "proteins"
    title = f"PTM-site prediction of run {record.get('run_name', '')}"
    note = (f"Each PTM type with enough sites in the test split is a task: its candidates are the residues it "
            f"modifies, in proteins read without any PTM token; a linear probe (logistic regression on "
            f"standardised features) is scored by {record.get('folds')}-fold cross-validation that never splits "
            f"{unit}. AUROC and AUPRC of the out-of-fold scores, with 95% intervals from "
            f"{record.get('bootstrap')} bootstrap resamples of the {unit} (the same table is in ptm_sites.tsv).")
    body = _heading(title, note)
    if shown:
        body += html_table(("PTM type", "residue", "features", "proteins", "candidates", "sites",
                            "AUROC [95% CI]", "AUPRC [95% CI]"), shown)
    else:
        body += '<p class="note">No PTM type has enough sites in the test split for a task.</p>'
    skipped = record.get("skipped") or []
    if skipped:
        body += (f"\n<h2>Left out ({_plural(len(skipped), 'PTM type')})</h2>\n"
                 + html_table(("PTM type", "sites", "why"),
                              [(ptm_name(s["ptm"]), s["sites"], s["why"]) for s in skipped]))
    return _write_page(out_html, title, body)


def cmd_plots(args: argparse.Namespace) -> None:
    """``ptm-mamba plots``: the figures and tables (TSV and HTML) of one run into ``--output_dir``."""
    from .guard import refuse_overwrite

    out = report_files(args.output_dir)
    reads = {"--metrics": args.metrics, "--summary": args.summary, "--provenance": args.provenance,
             "--config": args.config, **{f"--embeddings ({e})": e for e in args.embeddings or []}}
    refuse_overwrite({f"--output_dir ({path.name})": path for path in out.values()},
                     {label: path for label, path in reads.items() if path})
    written = list(plot_metrics(args.metrics, args.output_dir).values())
    written.append(test_results_table(args.metrics, out["test_results"]))
    written.append(test_results_html(written[-1], out["test_results_html"]))
    if args.summary:
        written.append(split_table(args.summary, out["splits"]))
        written.append(table_html(written[-1], out["splits_html"], "Split sizes",
                                  "Proteins, residues and PTM sites per split after the split stage (summary.json); "
                                  "the fingerprint identifies a split's exact content."))
    if args.embeddings:
        written.append(embedding_stats(args.embeddings, out["embeddings"]))
        written.append(embeddings_html(written[-1], out["embeddings_html"]))
    if args.provenance:
        written.append(provenance_table(args.provenance, out["provenance"]))
        written.append(provenance_html(written[-1], out["provenance_html"]))
    if args.config:
        written.append(config_html(args.config, out["config_html"]))
    rows = run_summary(args.metrics, args.summary, args.config, args.provenance)
    written.append(_write_tsv(out["run_summary"], ("item", "value"), rows))
    written.append(summary_html(rows, out["run_summary_html"]))
    for path in written:
        print(path)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``plots`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("plots", help="training curves, test accuracy per PTM type and data tables of a run")
    p.add_argument("--metrics", required=True, help="the run's metrics.json")
    p.add_argument("--summary", default=None, help="the split stage's summary.json (-> splits.tsv)")
    p.add_argument("--embeddings", nargs="+", default=None,
                   help="gathered {split}_embeddings.h5 files (-> embeddings.tsv)")
    p.add_argument("--provenance", default=None,
                   help="the run's provenance.json (-> provenance.tsv; a missing file is noted there)")
    p.add_argument("--config", default=None, help="the run's config.yaml (-> config.html, and the run summary)")
    option(p, "output_dir", required=True, help="folder for the PNGs, TSVs and HTML pages")
    p.set_defaults(func=cmd_plots)
    return p
