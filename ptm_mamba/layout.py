"""Where the pipeline's files are: one definition of each name and path.

The CLI's stages and the Snakefile (``workflow/rules/common.smk``) both build their paths
here, so a rule's output is by construction the file the stage writes and the next stage
reads. Snakemake passes wildcard patterns through the same functions, e.g.
``shard_path(EMBEDDINGS_DIR, "{split}", "{shard}", 4)``.

    results/split/                      the split stage: split_paths()
    results/clusters/clusters.tsv       the cluster stage (dataset.split_by: cluster)
    results/configs/<sha256[:16]>.yaml  the config a Snakemake invocation's jobs read
    {embeddings_dir}/shards/{split}/{i}-of-{n}.h5    one embed job's shard
    {embeddings_dir}/{split}_embeddings.h5          a split's gathered embeddings
    {output_dir}/ptm-mamba-{run_name}/              a training run: RUN_FILES (+ resume/)
    results/predictions/{run_name}/{name}.h5        predict on predict.inputs
    results/report/{run_name}/                      the report's figures and tables: report_files()
    results/evaluate/{run_name}/ptm_sites.{tsv,json,png}  the evaluate stage (PTM-site probes)
    results/compare/compare.{tsv,json,html} + curves.png  the compare step over config `runs:`
    NAME.csv + NAME.summary.json                    the prepare stage's CSV (dataset.dataset_location)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from pathlib import Path

SPLITS = ("train", "val", "test")
SPLIT_MAPPING, SPLIT_SUMMARY = "split_mapping.json", "summary.json"

# Where the workflow keeps its intermediate files (the CLI takes these as arguments).
SPLIT_DIR = "results/split"
CLUSTERS_FILE = "results/clusters/clusters.tsv"
CONFIGS_DIR = "results/configs"
PREDICTIONS_DIR = "results/predictions"
REPORTS_DIR = "results/report"
EVALUATE_DIR = "results/evaluate"
COMPARE_DIR = "results/compare"
# The evaluate stage's files in evaluation_dir(run_name), and the compare step's in COMPARE_DIR.
EVALUATION_FILES = ("ptm_sites.tsv", "ptm_sites.json", "ptm_sites.png")
EVALUATION_PAGE = "ptm_sites.html"  # ptm_sites.tsv as a page for the report, beside it
COMPARE_FILES = ("compare.tsv", "compare.json", "curves.png")
COMPARE_PAGE = "compare.html"  # compare.tsv's tables as a page for the report, beside it

RUN_PREFIX = "ptm-mamba-"
CONFIG_FILE, METRICS_FILE, BEST_CKPT, LAST_CKPT = "config.yaml", "metrics.json", "best.ckpt", "last.ckpt"
PROVENANCE_FILE, RESUME_DIR = "provenance.json", "resume"
# What a finished training run folder holds (its split_mapping.json is the split stage's SPLIT_MAPPING).
RUN_FILES = (CONFIG_FILE, SPLIT_MAPPING, METRICS_FILE, BEST_CKPT, LAST_CKPT, PROVENANCE_FILE)
# A workflow run must have a name Snakemake knows before it starts; a standalone
# `ptm-mamba train` without one is named by its start time (timestamp_run_name).
WORKFLOW_RUN_NAME = "default"


def split_csv(split_dir: str | os.PathLike, split: str) -> Path:
    return Path(split_dir) / f"{split}.csv"


def split_paths(split_dir: str | os.PathLike) -> dict[str, Path]:
    """The split stage's unit of files by key: train, val, test, mapping, summary. summary.json,
    written last, records the hashes of the others."""
    return {**{split: split_csv(split_dir, split) for split in SPLITS},
            "mapping": Path(split_dir) / SPLIT_MAPPING, "summary": Path(split_dir) / SPLIT_SUMMARY}


def split_store_path(embeddings_dir: str | os.PathLike, split: str) -> Path:
    return Path(embeddings_dir) / f"{split}_embeddings.h5"


def shard_path(embeddings_dir: str | os.PathLike, split: str, index: int | str, num_shards: int) -> Path:
    return Path(embeddings_dir) / "shards" / split / f"{index}-of-{num_shards}.h5"


def invocation_config(text: str) -> Path:
    """Where a Snakemake invocation puts the config its jobs read: named by its content's hash."""
    return Path(CONFIGS_DIR) / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"


def edited_invocation_config(path: str | os.PathLike, text: str) -> bool:
    """Whether ``path`` is an invocation's config (:func:`invocation_config`) whose ``text`` no longer
    has the hash its name says (edited after the workflow wrote it, e.g. between a job's segments)."""
    path = Path(path)
    named = path.parent.name == Path(CONFIGS_DIR).name and re.fullmatch(r"[0-9a-f]{16}\.yaml", path.name)
    return bool(named) and invocation_config(text).name != path.name


def timestamp_run_name() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")


def run_dir(output_dir: str | os.PathLike, run_name: str) -> Path:
    return Path(output_dir) / f"{RUN_PREFIX}{run_name}"


def run_files(folder: str | os.PathLike) -> dict[str, Path]:
    """A run folder's :data:`RUN_FILES` by name."""
    return {name: Path(folder) / name for name in RUN_FILES}


def report_dir(run_name: str) -> Path:
    return Path(REPORTS_DIR) / run_name


# The report's files (`ptm-mamba plots`, the workflow's plots rule): a PNG per figure; each table as a
# TSV to download and as an HTML page to read (Snakemake's report shows .html inline); config.yaml as a page.
REPORT_FIGURES = ("loss", "accuracy", "learning_rate", "throughput", "test_ptm_accuracy")
REPORT_TABLES = ("test_results", "splits", "embeddings", "provenance", "run_summary")


def report_files(folder: str | os.PathLike) -> dict[str, Path]:
    """A report folder's files by key: ``{figure}`` (its PNG), ``{table}`` (its TSV), ``{table}_html``
    and ``config_html``, in the order ``ptm-mamba plots`` checks them."""
    folder = Path(folder)
    files = {name: folder / f"{name}.png" for name in REPORT_FIGURES}
    for table in REPORT_TABLES:
        files[table], files[f"{table}_html"] = folder / f"{table}.tsv", folder / f"{table}.html"
    files["config_html"] = folder / f"{Path(CONFIG_FILE).stem}.html"
    return files


def prepared_summary_path(csv_path: str | os.PathLike) -> Path:
    """The prepare stage's record beside the CSV it wrote: ``NAME.summary.json`` for ``NAME.csv``."""
    path = Path(csv_path)
    return path.with_name(f"{path.stem}.summary.json")


def prediction_path(run_name: str, name: str) -> Path:
    return Path(PREDICTIONS_DIR) / run_name / f"{name}.h5"


def evaluation_dir(run_name: str) -> Path:
    return Path(EVALUATE_DIR) / run_name


def evaluation_files(run_name: str) -> dict[str, Path]:
    """The evaluate stage's files of one run by name: ptm_sites.tsv, ptm_sites.json, ptm_sites.png."""
    return {name: evaluation_dir(run_name) / name for name in EVALUATION_FILES}


def evaluation_outputs(folder: str | os.PathLike) -> dict[str, Path]:
    """What the evaluate stage writes into ``folder`` by name: :data:`EVALUATION_FILES` and
    :data:`EVALUATION_PAGE` (``evaluation_outputs(evaluation_dir(run_name))`` in the workflow)."""
    return {name: Path(folder) / name for name in (*EVALUATION_FILES, EVALUATION_PAGE)}


def compare_files() -> dict[str, Path]:
    """The compare step's files by name: compare.tsv, compare.json, curves.png."""
    return {name: Path(COMPARE_DIR) / name for name in COMPARE_FILES}


def compare_outputs(folder: str | os.PathLike = COMPARE_DIR) -> dict[str, Path]:
    """What the compare step writes into ``folder`` by name: :data:`COMPARE_FILES` and :data:`COMPARE_PAGE`."""
    return {name: Path(folder) / name for name in (*COMPARE_FILES, COMPARE_PAGE)}
