"""Nothing a user points at is lost: no command writes over a file it reads (ptm_mamba/guard.py).

Each write command is given, as its output, a file that it reads: the one named on its command
line, or one its config or checkpoint names (the dataset, the ESM-2 weights, a checkpoint a run
starts from); by the same path, another spelling of it, a symlink or a hard link. Each refuses in
one line, and the file is unchanged byte for byte. The workflow-level cases (a fine-tune that
points into its own run folder, two projects sharing a run folder) are in tests/test_workflow.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import SEQS, error_line, run_cli, settings_for, write_config, write_csv, toy_rows
from ptm_mamba.guard import check_run_owner
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import (BEST_CKPT, CONFIG_FILE, LAST_CKPT, METRICS_FILE, PROVENANCE_FILE, RUN_PREFIX,
                              report_files, shard_path, split_csv, split_paths)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fasta(path: Path) -> Path:
    path.write_text("".join(f">{k}\n{v}\n" for k, v in SEQS.items()))
    return path


def esm_file(config: dict) -> Path:
    return Path(config["esm"]["model"])


def test_predict_refuses_the_esm_weights_its_checkpoint_names(checkpoint, embedded_project, tmp_path):
    _, config = embedded_project
    weights, regression = esm_file(config), esm_file(config).with_name(esm_file(config).stem + "-contact-regression.pt")
    before = {p: digest(p) for p in (weights, regression)}
    os.link(weights, tmp_path / "hard-link.pt")
    for output in (weights, regression, weights.parent / ".." / weights.parent.name / weights.name,
                   tmp_path / "hard-link.pt"):
        result = run_cli("predict", "--checkpoint", checkpoint, "--input", fasta(tmp_path / "p.fasta"),
                         "--output", output)
        error_line(result, "which this command reads", "ESM-2 weights", "nothing was written")
    assert {p: digest(p) for p in before} == before


def test_import_original_refuses_its_esm_weights(embedded_project, tmp_path):
    _, config = embedded_project
    before = digest(esm_file(config))
    original = Path(__file__).parent / "fixtures" / "original" / "hydra-1.3.2_omegaconf-2.3.0.ckpt"
    result = run_cli("import-original", "--checkpoint", original, "--output", esm_file(config),
                     "--esm-model", esm_file(config))
    error_line(result, f"--output {esm_file(config)} is --esm_model ({esm_file(config).name})")
    assert digest(esm_file(config)) == before


def test_split_cluster_embed_and_gather_refuse_their_inputs(embedded_project, tmp_path):
    root, config = embedded_project
    # a dataset named like a split file, in the folder the split writes
    (tmp_path / "split").mkdir()
    data = write_csv(split_csv(tmp_path / "split", "train"), toy_rows(30))
    cfg = write_config(tmp_path / "c.yaml", **{**config, "dataset": {**config["dataset"], "dataset_location": str(data)}})
    before = digest(data)
    error_line(run_cli("split", "--config", cfg, "--output_dir", tmp_path / "split"),
               f"--output_dir ({data.name})", "is dataset.dataset_location")
    error_line(run_cli("cluster", "--config", cfg, "--output", data), "--output", "is dataset.dataset_location")
    assert digest(data) == before

    split = split_paths(root / "split")
    shards = [shard_path(root / "embeddings", "val", i, 2) for i in range(2)]
    before = {p: digest(p) for p in (split["val"], split["summary"], *shards)}
    cfg = write_config(tmp_path / "c2.yaml", **config)
    shard = ["embed-shard", "--config", cfg, "--split", "val", "--split_file", split["val"],
             "--shard", "0", "--num_shards", "2"]
    error_line(run_cli(*shard, "--output", split["val"]), "is --split_file")
    error_line(run_cli(*shard, "--output", split["summary"]), "is --split_unit")
    error_line(run_cli(*shard, "--output", esm_file(config)), "is esm.model")
    error_line(run_cli("gather", "--config", cfg, "--split", "val", "--split_file", split["val"],
                       "--shards", *shards, "--output", shards[1]), f"is --shards ({shards[1]})")
    assert {p: digest(p) for p in before} == before


def test_train_refuses_a_start_checkpoint_in_its_own_run_folder(checkpoint, embedded_project, tmp_path):
    """The CLI's form of the fine-tune that Snakemake would have deleted first: refused, the run intact."""
    root, config = embedded_project
    run = checkpoint.parent
    before = {p.name: digest(p) for p in run.iterdir() if p.is_file()}
    for key, file in (("init_from", BEST_CKPT), ("resume_from_checkpoint", LAST_CKPT)):
        cfg = {**config, "run_name": run.name.removeprefix(RUN_PREFIX),
               "training": {**config["training"], key: str(run / file)}}
        result = run_cli("train", "--config", write_config(tmp_path / "c.yaml", **cfg), "--split_dir", root / "split")
        error_line(result, f"training.{key} {run / file} lies in the run folder {run}/", "new run_name")
    assert {p.name: digest(p) for p in run.iterdir() if p.is_file()} == before


def test_a_run_folder_knows_whose_it_is(checkpoint, embedded_project, tmp_path, monkeypatch):
    """Another project (another working directory) with another split_seed may neither adopt nor
    replace the run; with the same settings it holds the same computation."""
    from ptm_mamba.config import load_config

    root, run = embedded_project[0], checkpoint.parent
    cfg = load_config(run / CONFIG_FILE)  # the settings the run was made with
    recorded = json.loads((run / PROVENANCE_FILE).read_text())
    assert recorded["project"] == str(Path.cwd().resolve()) and set(recorded["settings"]) == {"split", "embed", "train"}
    check_run_owner(settings_for(cfg), run)  # this project's own run
    monkeypatch.chdir(tmp_path)  # project B
    check_run_owner(settings_for(cfg), run)  # the same settings: the same computation
    other = {**cfg, "dataset": {**cfg["dataset"], "split_seed": 7}}
    with pytest.raises(PipelineError, match=rf"^{run} holds a run of the project in {recorded['project']}, made with "
                                            r"other settings \(split dataset.split_seed: 42 there, 7 here\); this "
                                            rf"project \({tmp_path.resolve()}\) will neither adopt nor replace it"):
        check_run_owner(settings_for(other), run)
    before = digest(run / BEST_CKPT)
    result = run_cli("train", "--config", write_config(tmp_path / "b.yaml", **other), "--split_dir", root / "split")
    error_line(result, f"{run} holds a run of the project in", "use another run_name or training.output_dir")
    assert digest(run / BEST_CKPT) == before


def test_an_invocation_config_edited_between_segments_is_refused(embedded_project, tmp_path, monkeypatch):
    """The workflow's jobs (and a train job's resubmitted segments) read results/configs/<hash>.yaml,
    named by its content: an edited one no longer matches its name."""
    from ptm_mamba import layout
    from ptm_mamba.config import dump_config, load_config
    from ptm_mamba.fileio import atomic_write_text

    root, config = embedded_project
    monkeypatch.chdir(tmp_path)
    text = dump_config(config)
    path = layout.invocation_config(text)
    atomic_write_text(path, text)
    assert load_config(path) == config
    path.write_text(text.replace("lr: 0.003", "lr: 0.03"))
    result = run_cli("split", "--config", path, "--output_dir", tmp_path / "split")
    error_line(result, f"{path}: edited after the workflow wrote it")
    assert not (tmp_path / "split").exists()


def test_plots_refuse_an_input_among_their_outputs(checkpoint, tmp_path):
    metrics = report_files(tmp_path)["test_results"]  # a metrics file named like a table plots writes
    metrics.write_bytes((checkpoint.parent / METRICS_FILE).read_bytes())
    before = digest(metrics)
    error_line(run_cli("plots", "--metrics", metrics, "--output_dir", tmp_path),
               f"--output_dir ({metrics.name}) {metrics} is --metrics")
    assert digest(metrics) == before
