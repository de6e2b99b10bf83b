"""The compare step: the runs of a sweep (the config's ``runs:``) side by side.

For each run, from its ``metrics.json`` (:func:`ptm_mamba.report.load_metrics`): the optimiser steps, the
final and the lowest validation loss, and the test loss, accuracy and PTM accuracy of ``best.ckpt``;
with ``--evaluations``, from the evaluate stage's ``ptm_sites.json`` of the run, the AUROC of each PTM
type's probe per feature set (``ptm_mamba``, ``esm2``, ``onehot``). Runs whose overrides are the same
once ``seed`` is left out form a group (they differ only by seed); each group of two or more runs gets a
row of mean ± standard deviation (sample sd, n - 1) over its runs, and its n.

Outputs (:func:`ptm_mamba.layout.compare_outputs`), each written atomically:

- ``compare.tsv``: a row per run, then a row per seed group (its cells ``mean ± sd``), a column per
  overridden key and per metric (``auroc <PTM> (<residue>) <features>`` for the evaluation);
- ``compare.json``: the same as numbers (each run's values, each group's mean, sd, n and values);
- ``curves.png``: the training loss (moving average) and the validation loss of every run, overlaid,
  one colour per group;
- ``compare.html``: the tables as a page for the Snakemake report.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import PipelineError
from .fileio import read_json
from .options import option

# (key, what it is), in the table's order.
METRICS = (
    ("steps", "optimiser steps"),
    ("val_loss", "final validation loss"),
    ("best_val_loss", "lowest validation loss (best.ckpt)"),
    ("test_loss", "test loss (best.ckpt)"),
    ("test_acc", "test accuracy (best.ckpt)"),
    ("test_ptm_acc", "test PTM accuracy (best.ckpt)"),
)
PLUS_MINUS = "±"


@dataclass
class RunRow:
    """One run: its overrides, its metrics and (with an evaluation) AUROC by task and feature set."""

    name: str
    overrides: dict
    metrics: dict[str, float | int | None]
    auroc: dict[str, dict[str, float | None]] = field(default_factory=dict)  # task -> features -> AUROC
    sites: dict[str, int] = field(default_factory=dict)  # task -> sites (for the order of tasks)
    curves: dict[str, tuple[list, list]] = field(default_factory=dict)  # train / val: (steps, losses)


def flat(overrides: dict, prefix: str = "") -> dict[str, Any]:
    """A run's overrides by dotted key (``training.lr``); lists stay values."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def seed_groups(runs: dict[str, dict]) -> list[tuple[dict[str, Any], list[str]]]:
    """The runs grouped by their overrides without ``seed``: ``[(shared overrides, [run names])]``, in
    the order of each group's first run."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for name, overrides in runs.items():
        shared = {k: v for k, v in flat(overrides).items() if k != "seed"}
        key = json.dumps(shared, sort_keys=True)
        groups.setdefault(key, (shared, []))[1].append(name)
    return list(groups.values())


def _value(record: dict | None, key: str) -> float | None:
    value = (record or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_metrics(metrics_path: str | Path) -> tuple[dict[str, float | int | None], dict]:
    """A run's row values from its metrics.json, and its loss curves."""
    from .report import load_metrics, moving_average, smoothing_window

    m = load_metrics(metrics_path)
    last_val, best = (m.val[-1] if m.val else None), m.best_val()
    values = {"steps": int(m.train[-1]["Step"]) if m.train else None,
              "val_loss": _value(last_val, "avg_val_loss"), "best_val_loss": _value(best, "avg_val_loss"),
              "test_loss": _value(m.test, "avg_test_loss"), "test_acc": _value(m.test, "avg_test_acc"),
              "test_ptm_acc": _value(m.test, "avg_test_ptm_acc")}
    steps, losses = m.series("train", "train_loss")
    smooth = moving_average(losses, smoothing_window(steps.size))
    val_steps, val_losses = m.series("val", "avg_val_loss")
    return values, {"train": (steps.tolist(), smooth.tolist()), "val": (val_steps.tolist(), val_losses.tolist())}


def task_name(task: dict) -> str:
    """``Phosphoserine (S)`` for ``{"ptm": "<Phosphoserine>", "residue": "S"}``."""
    from .report import ptm_name

    return f"{ptm_name(str(task['ptm']))} ({task['residue']})" if task.get("residue") else ptm_name(str(task["ptm"]))


def read_evaluation(path: str | Path, run: str) -> tuple[dict[str, dict[str, float | None]], dict[str, int]]:
    """AUROC by task and feature set, and sites by task, from the evaluate stage's ``ptm_sites.json``
    of ``run`` (``{"run_name", "tasks": [{"ptm", "residue", "sites", "features": {name: {"auroc", ...}}}]}``)."""
    path = Path(path)
    record = read_json(path, f"run the evaluate stage of run {run} first")
    if not isinstance(record, dict) or not isinstance(record.get("tasks"), list):
        raise PipelineError(f"{path}: expected the evaluate stage's record, {{\"run_name\", \"tasks\": [...]}}")
    if record.get("run_name", run) != run:
        raise PipelineError(f"{path}: the evaluation of run {record['run_name']!r}, not of run {run!r}")
    auroc, sites = {}, {}
    for i, task in enumerate(record["tasks"]):
        if not (isinstance(task, dict) and "ptm" in task and isinstance(task.get("features"), dict)):
            raise PipelineError(f"{path}: task {i} lacks ptm or features")
        name = task_name(task)
        auroc[name] = {feature: _value(m if isinstance(m, dict) else None, "auroc")
                       for feature, m in task["features"].items()}
        sites[name] = int(task.get("sites") or 0)
    return auroc, sites


def mean_sd(values: Sequence[float | None]) -> dict | None:
    """``{"mean", "sd", "n", "values"}`` over the values that are numbers (sd: sample sd, None for n < 2)."""
    numbers = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not numbers:
        return None
    sd = statistics.stdev(numbers) if len(numbers) > 1 else None
    return {"mean": statistics.fmean(numbers), "sd": sd, "n": len(numbers), "values": numbers}


def compare(runs: dict[str, dict], metrics: dict[str, str | Path],
            evaluations: dict[str, str | Path] | None = None) -> dict:
    """The compare record: ``runs`` (name -> overrides), each run's metrics.json and (optional)
    ptm_sites.json by name. compare.json is this record without each run's ``curves`` (the loss curves
    the figure overlays; metrics.json holds them)."""
    rows = []
    for name, overrides in runs.items():
        values, curves = run_metrics(metrics[name])
        row = RunRow(name, overrides, values, curves=curves)
        if evaluations:
            row.auroc, row.sites = read_evaluation(evaluations[name], name)
        rows.append(row)
    sites: dict[str, int] = {}
    for row in rows:
        for task, n in row.sites.items():
            sites[task] = max(sites.get(task, 0), n)
    tasks = sorted(sites, key=lambda t: (-sites[t], t))
    features = list(dict.fromkeys(f for row in rows for t in tasks for f in row.auroc.get(t, {})))
    by_name = {row.name: row for row in rows}
    groups = []
    for shared, names in seed_groups(runs):
        if len(names) < 2:
            continue  # a run alone: its own row says it all
        members = [by_name[n] for n in names]
        groups.append({
            "group": describe_group(shared), "overrides": shared, "runs": names, "n": len(names),
            "seeds": [flat(by_name[n].overrides).get("seed") for n in names],
            "metrics": {key: mean_sd([r.metrics.get(key) for r in members]) for key, _ in METRICS},
            "auroc": {t: {f: mean_sd([r.auroc.get(t, {}).get(f) for r in members]) for f in features}
                      for t in tasks}})
    return {
        "metrics": dict(METRICS), "tasks": tasks, "features": features,
        "runs": [{"run": r.name, "overrides": r.overrides, "metrics": r.metrics,
                  "auroc": {t: r.auroc.get(t, {}) for t in tasks} if evaluations else {},
                  "metrics_file": str(metrics[r.name]),
                  "evaluation_file": str(evaluations[r.name]) if evaluations else None,
                  "curves": {kind: {"steps": s, "loss": v} for kind, (s, v) in r.curves.items()}}
                 for r in rows],
        "groups": groups,
    }


def describe_group(shared: dict[str, Any]) -> str:
    """A seed group's name: its overrides other than seed (``training.use_esm=false``), or ``seeds only``."""
    if not shared:
        return "seeds only"
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in shared.items())


def _num(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return json.dumps(value) if not isinstance(value, str) else value
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.{digits}g}"


def _stat(stat: dict | None) -> str:
    """``mean ± sd`` (just the value for n = 1)."""
    if stat is None:
        return ""
    if stat["sd"] is None:
        return _num(stat["mean"])
    return f"{_num(stat['mean'])} {PLUS_MINUS} {_num(stat['sd'], 2)}"


def table(record: dict) -> tuple[list[str], list[list[str]]]:
    """compare.tsv's header and rows: a row per run, then a row per seed group."""
    keys = list(dict.fromkeys(k for r in record["runs"] for k in flat(r["overrides"])))
    if "seed" in keys:  # seed first: it is what a seed group's runs differ by
        keys.remove("seed")
        keys.insert(0, "seed")
    auroc = [(t, f) for t in record["tasks"] for f in record["features"]]
    header = ["run", "n", *keys, *(key for key, _ in METRICS), *(f"auroc {t} {f}" for t, f in auroc)]
    rows = []
    for r in record["runs"]:
        overrides = flat(r["overrides"])
        rows.append([r["run"], "1", *(_num(overrides[k]) if k in overrides else "" for k in keys),
                     *(_num(r["metrics"].get(key)) for key, _ in METRICS),
                     *(_num(r["auroc"].get(t, {}).get(f)) for t, f in auroc)])
    for g in record["groups"]:
        shared = g["overrides"]
        cells = [", ".join(_num(s) for s in g["seeds"]) if k == "seed" else _num(shared[k]) if k in shared else ""
                 for k in keys]
        rows.append([f"mean {PLUS_MINUS} sd: {', '.join(g['runs'])}", str(g["n"]), *cells,
                     *(_stat(g["metrics"].get(key)) for key, _ in METRICS),
                     *(_stat(g["auroc"].get(t, {}).get(f)) for t, f in auroc)])
    return header, rows


def write_tsv(record: dict, path: str | Path) -> Path:
    from .fileio import atomic_write_text

    header, rows = table(record)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def plot_curves(record: dict, path: str | Path) -> Path:
    """Training loss (moving average) and validation loss of every run, one colour per seed group."""
    from .report import FIGSIZE, _figure, _placeholder, _save

    fig, (train_ax, val_ax) = _figure(height=FIGSIZE[1] * 1.6, rows=2)
    runs = record["runs"]
    group_of = {name: i for i, g in enumerate(record["groups"]) for name in g["runs"]}
    colours, styles = {}, ("-", "--", ":", "-.")
    singles = len(record["groups"])
    for r in runs:  # a colour per group, and one per run outside any group
        if r["run"] in group_of:
            colours[r["run"]] = f"C{group_of[r['run']] % 10}"
        else:
            colours[r["run"]] = f"C{singles % 10}"
            singles += 1
    seen: dict[str, int] = {}
    for r in runs:
        colour = colours[r["run"]]
        style = styles[seen.get(colour, 0) % len(styles)]
        seen[colour] = seen.get(colour, 0) + 1
        train, val = r["curves"]["train"], r["curves"]["val"]
        if train["steps"]:
            train_ax.plot(train["steps"], train["loss"], color=colour, ls=style, lw=1.4, label=r["run"])
        if val["steps"]:
            val_ax.plot(val["steps"], val["loss"], color=colour, ls=style, lw=1.4, marker="o", ms=3,
                        label=r["run"])
    for ax, title in ((train_ax, "Training loss (moving average)"), (val_ax, "Validation loss")):
        if not ax.lines:
            _placeholder(ax, title, "no steps recorded")
            continue
        ax.set(title=title, xlabel="optimiser step", ylabel="loss (nats per masked token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", ncol=2 if len(runs) > 6 else 1)
    fig.suptitle(f"{len(runs)} runs" + ("; runs that differ only by seed share a colour" if record["groups"] else ""))
    return _save(fig, Path(path))


def write_html(record: dict, path: str | Path) -> Path:
    """The tables as a page: the runs and seed groups, then AUROC by PTM type and feature set."""
    from .report import _heading, _write_page, html_table

    header, rows = table(record)
    n_metric = len(header) - sum(h.startswith("auroc ") for h in header)
    body = _heading("Runs side by side",
                    "Each run of the sweep (config runs:), then, for runs that differ only by seed, their mean "
                    f"{PLUS_MINUS} standard deviation (sample sd) and n. Losses are nats per masked token; the test "
                    "results are those of each run's best.ckpt. The same table is in compare.tsv, the numbers "
                    "in compare.json.")
    body += html_table(header[:n_metric], [row[:n_metric] for row in rows],
                       row_class=lambda r: "total" if r[0].startswith("mean ") else None)
    if record["tasks"]:
        columns = [r["run"] for r in record["runs"]] + [f"mean {PLUS_MINUS} sd ({', '.join(g['runs'])})"
                                                        for g in record["groups"]]
        auroc_rows = []
        for t in record["tasks"]:
            for f in record["features"]:
                auroc_rows.append([f"{t}: {f}", *(_num(r["auroc"].get(t, {}).get(f)) for r in record["runs"]),
                                   *(_stat(g["auroc"][t].get(f)) for g in record["groups"])])
        body += ("\n<h2>PTM-site probes: AUROC per PTM type and feature set</h2>\n<p class=\"note\">The evaluate "
                 "stage's linear probes on each run's test split (ptm_mamba: the run's hidden states; esm2: ESM-2 "
                 "alone; onehot: the residues around the site).</p>\n"
                 + html_table(["PTM type: features", *columns], auroc_rows, label_columns=(0,)))
    return _write_page(path, "Runs side by side", body)


def write_outputs(record: dict, files: dict[str, Path]) -> list[Path]:
    """compare.tsv, compare.json, curves.png and compare.html into ``files`` (layout.compare_outputs)."""
    from .fileio import atomic_write_json
    from .layout import COMPARE_PAGE

    tsv, js, png = (files[name] for name in ("compare.tsv", "compare.json", "curves.png"))
    Path(tsv).parent.mkdir(parents=True, exist_ok=True)
    written = [write_tsv(record, tsv)]
    atomic_write_json(js, {**record, "runs": [{k: v for k, v in r.items() if k != "curves"}
                                              for r in record["runs"]]})
    written += [Path(js), plot_curves(record, png), write_html(record, files[COMPARE_PAGE])]
    return written


def sweep_inputs(config: dict, evaluations: bool) -> tuple[dict, dict, dict | None]:
    """The runs of a validated config with runs: (name -> overrides), each one's metrics.json and
    (``evaluations``) ptm_sites.json, where the workflow writes them."""
    from .layout import METRICS_FILE, evaluation_files, run_dir
    from .config import settings_of_run

    runs = config.get("runs")
    if not runs:
        raise PipelineError("the config has no runs: to compare (compare puts the runs of a sweep side by side)")
    metrics = {name: run_dir(settings_of_run(config, name).training.output_dir, name) / METRICS_FILE
               for name in runs}
    found = {name: evaluation_files(name)["ptm_sites.json"] for name in runs} if evaluations else None
    return runs, metrics, found


def summary(compare_json: str | Path) -> str:
    """A few lines on a finished sweep, for the end of the workflow ("" without compare.json)."""
    try:
        record = json.loads(Path(compare_json).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""

    def line(name: str, values: dict, fmt) -> str:
        parts = [f"{label} {fmt(values.get(key))}" for key, label in (("test_loss", "test loss"),
                                                                       ("test_ptm_acc", "test PTM accuracy"))]
        return f"  {name}: " + ", ".join(parts)

    lines = [f"PTM-Mamba sweep of {len(record['runs'])} runs:"]
    lines += [line(r["run"], r["metrics"], _num) for r in record["runs"]]
    lines += [line(f"mean {PLUS_MINUS} sd over {', '.join(g['runs'])}", g["metrics"], _stat)
              for g in record["groups"]]
    folder = Path(compare_json).parent
    lines.append(f"  side by side: {folder}/ (compare.tsv, compare.json, curves.png); the HTML report: "
                 "snakemake --report report.html")
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> None:
    """``ptm-mamba compare``: the runs of the config's sweep side by side, into ``--output_dir``."""
    from .config import load_config
    from .guard import refuse_overwrite
    from .layout import compare_outputs

    config = load_config(args.config)
    runs, metrics, evaluations = sweep_inputs(config, args.evaluations)
    files = compare_outputs(args.output_dir)
    reads = {"--config": args.config, **{f"run {n}'s metrics": p for n, p in metrics.items()},
             **{f"run {n}'s evaluation": p for n, p in (evaluations or {}).items()}}
    refuse_overwrite({f"--output_dir ({path.name})": path for path in files.values()}, reads)
    record = compare(runs, metrics, evaluations)
    for path in write_outputs(record, files):
        print(path)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("compare", help="the runs of a sweep (the config's runs:) side by side: metrics, "
                       "mean ± sd over seeds, overlaid loss curves")
    p.add_argument("--config", required=True, help="the pipeline config with runs: (each run's metrics.json is "
                   "read from its folder, {training.output_dir}/ptm-mamba-{run}/)")
    option(p, "output_dir", required=True, help="folder for compare.tsv, compare.json, curves.png, compare.html")
    p.add_argument("--evaluations", action="store_true",
                   help="also read each run's evaluation (results/evaluate/{run}/ptm_sites.json): AUROC per "
                   "PTM type and feature set")
    p.set_defaults(func=cmd_compare)
    return p
