"""What the workflow says when it ends (the Snakefile's onsuccess / onerror).

On success: how the run did (test loss and accuracies of ``best.ckpt``, the best validation) and
where its outputs and report are. On failure: the one-line error each failed job wrote in its log,
so it is on the screen, not only in ``logs/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PipelineError
from .layout import BEST_CKPT, CONFIG_FILE, LAST_CKPT, METRICS_FILE, PROVENANCE_FILE


def run_summary(run_dir: str | os.PathLike, report_dir: str | os.PathLike) -> str:
    """A few lines on the finished run in ``run_dir`` ("" when it has not been tested yet)."""
    from .report import load_metrics

    run_dir = Path(run_dir)
    try:
        metrics = load_metrics(run_dir / METRICS_FILE)
    except PipelineError:
        return ""
    if metrics.test is None:
        return ""
    test, best = metrics.test, metrics.best_val() or {}
    lines = [f"PTM-Mamba run {run_dir.name}: test loss {test['avg_test_loss']:.4f}, accuracy "
             f"{test['avg_test_acc']:.4f}, PTM accuracy {test['avg_test_ptm_acc']:.4f} (best.ckpt: val loss "
             f"{best.get('avg_val_loss', float('nan')):.4f} at step {best.get('Step', '?')})",
             f"  outputs: {run_dir}/ ({', '.join((BEST_CKPT, LAST_CKPT, METRICS_FILE, CONFIG_FILE, PROVENANCE_FILE))})",
             f"  figures and tables: {report_dir}/; the HTML report: snakemake --report report.html"]
    return "\n".join(lines)


def failed_job_errors(log_dir: str | os.PathLike, since: float) -> list[str]:
    """``log: error: ...`` for every log under ``log_dir`` written since ``since`` (a time.time())
    whose job ended with a one-line error of this package."""
    found = []
    for log in sorted(Path(log_dir).rglob("*.log")):
        if log.name.endswith(".segments.log"):  # the train log's history: its job's log says the same
            continue
        try:
            if log.stat().st_mtime < since:
                continue
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
        except OSError:
            continue
        if lines:
            found.append(f"{log}: {lines[-1]}")
    return found
