"""Sweeps (config `runs:`): a train job per run sharing one split and one set of embeddings, the
refusals of overrides that would need their own, and the compare step over real runs."""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, error_line, run_cli, tiny_config, write_config
from ptm_mamba import layout
from ptm_mamba.config import validate
from ptm_mamba.errors import PipelineError
from test_workflow import SNAKEMAKE, one_error_line, planned

pytestmark = pytest.mark.slow
SEEDS = {"s1": {"seed": 1}, "s2": {"seed": 2}, "s3": {"seed": 3}}
# the evaluate stage's jobs (another stage, also per run) are left out of the counts here
OTHER_STAGES = ("evaluate",)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny project (data, tiny ESM-2) and its config without runs."""
    root = tmp_path_factory.mktemp("sweep")
    return root, tiny_config(root, n=40)


def snakemake(root: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    path = write_config(root / "config.yaml", **config)
    result = subprocess.run([*SNAKEMAKE, *args, "--directory", str(root), "--configfile", str(path)],
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    return {rule: n for rule, n in planned(result).items() if not rule.startswith(OTHER_STAGES)}


def sweep(config: dict, runs: dict, **training) -> dict:
    config = copy.deepcopy(config)
    config["training"].update(training)
    return {**config, "run_name": None, "runs": copy.deepcopy(runs)}


def test_three_seeds_share_one_split_and_one_set_of_embeddings(project):
    root, config = project
    result = snakemake(root, sweep(config, SEEDS), "-n")
    shards = config["embedding"]["shards"]
    assert jobs(result) == {"split": 1, "embed_shard": 3 * shards, "gather_embeddings": 3, "train": 3,
                            "plots": 1, "compare": 1, "all": 1}
    out = result.stdout
    for run in SEEDS:
        assert f"--run_name {run} " in out and f"logs/train/{run}.log" in out
        assert str(layout.run_dir(config["training"]["output_dir"], run) / layout.METRICS_FILE) in out


def test_without_runs_the_dag_is_what_it_was(project):
    root, config = project
    result = snakemake(root, config, "-n")
    assert jobs(result) == {"split": 1, "embed_shard": 6, "gather_embeddings": 3, "train": 1, "plots": 1, "all": 1}
    assert "--run_name tiny " in result.stdout and "logs/train/tiny.log" in result.stdout
    assert "results/report/tiny/" in result.stdout and "compare" not in result.stdout


def test_an_override_that_needs_its_own_embeddings_or_is_unknown_is_one_line(project, tmp_path):
    root, config = project
    runs = {**SEEDS, "s2": {"seed": 2, "training": {"mask_prob": 0.3}}}
    line = one_error_line(snakemake(root, sweep(config, runs), "-n", check=False))
    assert ("runs.s2: training.mask_prob cannot be set per run: it is a setting of the embed stage, whose result "
            "the runs share") in line, line
    # the CLI's commands read the config through the same check (an unknown key here)
    runs = {**SEEDS, "s2": {"seed": 2, "training": {"mask_probability": 0.3}}}
    path = write_config(tmp_path / "c.yaml", **sweep(config, runs))
    error_line(run_cli("split", "--config", path, "--output_dir", tmp_path / "split"),
               "runs.s2.training: unknown key 'mask_probability'")


@pytest.mark.parametrize("runs, words", [
    ({"a": {"training": {"embeddings_dir": "elsewhere"}}}, "runs.a: training.embeddings_dir cannot be set per run"),
    ({"a": {"training": {"output_dir": "elsewhere"}}}, "runs.a: training.output_dir cannot be set per run"),
    ({"a": {"dataset": {"split_seed": 3}}}, "runs.a: unknown key 'dataset'"),
    ({"a": {"training": {"lr": "fast"}}}, "runs.a.training.lr: 'fast' is not a number"),
    ({"a": {"seed": 1.5}}, "runs.a.seed: 1.5 is not an integer"),
    ({"a/b": {"seed": 1}}, "runs: 'a/b' does not match"),
    ({}, "runs: {} should be non-empty"),
])
def test_the_config_refuses_bad_runs(project, runs, words):
    _, config = project
    with pytest.raises(PipelineError, match="^config: ") as err:
        validate(sweep(config, runs))
    assert words in str(err.value) and "\n" not in str(err.value), err.value


def test_a_run_that_reads_no_embeddings_may_change_their_keys_and_values_are_typed(project):
    _, config = project
    runs = {"a": {"training": {"use_precomputed_embeddings": False, "mask_prob": 0.3, "lr": "1e-3"}}}
    checked = validate(sweep(config, runs))
    assert checked["runs"]["a"]["training"] == {"use_precomputed_embeddings": False, "mask_prob": 0.3, "lr": 0.001}
    with pytest.raises(PipelineError, match="run_name: 'tiny' with runs"):
        validate({**sweep(config, runs), "run_name": "tiny"})


def test_the_cli_trains_a_named_run_with_its_overrides_or_says_which_runs_there_are(project, tmp_path):
    _, config = project
    path = write_config(tmp_path / "c.yaml", **sweep(config, SEEDS))
    error_line(run_cli("train", "--config", path, "--run_name", "s9"), "no run 's9'", "its runs are s1, s2, s3")
    error_line(run_cli("train", "--config", path), "defines runs (s1, s2, s3): name the one to train")
    from ptm_mamba.config import load_config
    from ptm_mamba.config import settings_of_run

    settings = settings_of_run(load_config(path), "s2")
    assert (settings.seed, settings.run_name, settings.runs) == (2, "s2", None)
    assert "runs" not in settings.as_dict()  # the run's config.yaml is a config of its own, without the sweep


TRAINED = {"s1": {"seed": 1}, "s2": {"seed": 2}}


@pytest.fixture(scope="module")
def swept(project) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """Two seeds trained for real by the workflow (ESM-2 on the fly: no embed jobs), and compared."""
    root, config = project
    sweep_config = sweep(config, TRAINED, use_precomputed_embeddings=False)
    return root, sweep_config, snakemake(root, sweep_config)


def metrics_of(root: Path, config: dict, run: str) -> Path:
    return root / layout.run_dir(config["training"]["output_dir"], run) / layout.METRICS_FILE


def test_compare_puts_the_runs_side_by_side_with_mean_and_sd_over_seeds(swept):
    root, config, result = swept
    files = {name: root / path for name, path in layout.compare_outputs().items()}
    record = json.loads(files["compare.json"].read_text())
    assert [r["run"] for r in record["runs"]] == list(TRAINED)
    test_losses = []
    for run in TRAINED:
        metrics = json.loads(metrics_of(root, config, run).read_text())
        test_losses.append(next(r for r in reversed(metrics) if "avg_test_loss" in r)["avg_test_loss"])
    assert len(set(test_losses)) == 2  # the seeds make different runs
    (group,) = record["groups"]
    assert group["runs"] == list(TRAINED) and group["n"] == 2 and group["overrides"] == {}
    stat = group["metrics"]["test_loss"]
    assert stat["mean"] == pytest.approx(statistics.fmean(test_losses))
    assert stat["sd"] == pytest.approx(statistics.stdev(test_losses))
    rows = [line.split("\t") for line in files["compare.tsv"].read_text().splitlines()]
    header, body = rows[0], rows[1:]
    assert header[:3] == ["run", "n", "seed"] and "test_loss" in header and "test_ptm_acc" in header
    assert [r[0] for r in body[:2]] == list(TRAINED) and [r[2] for r in body[:2]] == ["1", "2"]
    mean_row = body[2]
    assert mean_row[0] == "mean ± sd: s1, s2" and mean_row[1] == "2" and mean_row[2] == "1, 2"
    cell = mean_row[header.index("test_loss")]
    assert cell == f"{stat['mean']:.4g} ± {stat['sd']:.2g}", cell
    assert files["curves.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Runs side by side" in files["compare.html"].read_text()
    # the end of the workflow: each run and the seed group, and where the comparison is
    assert "PTM-Mamba sweep of 2 runs:" in result.stdout and "mean ± sd over s1, s2" in result.stdout
    assert not (root / config["training"]["embeddings_dir"]).exists()  # no run reads embeddings: none made


def test_changing_one_run_reruns_only_that_run(swept):
    """Its train job (and what reads it), nothing of the other run: each run's settings are its rerun trigger."""
    root, config, _ = swept
    changed = copy.deepcopy(config)
    changed["runs"]["s2"]["training"] = {"lr": 0.01}
    result = snakemake(root, changed, "-n")
    assert jobs(result) == {"train": 1, "compare": 1, "all": 1}  # plots: of the first run, s1
    assert "--run_name s2 " in result.stdout and "--run_name s1 " not in result.stdout
    assert f"changed since {config['training']['output_dir']}/ptm-mamba-s2 was made: train training.lr: 0.003 -> 0.01" \
        in result.stderr.splitlines()


def test_compare_groups_runs_that_differ_only_by_seed_and_reads_their_evaluations(swept, tmp_path):
    """Three seeds and a run of another lr (the real runs' metrics.json, and a copy with other values);
    AUROC per PTM type and feature set from the evaluate stage's ptm_sites.json, mean ± sd over seeds."""
    from ptm_mamba.compare import compare, write_outputs

    root, config, _ = swept
    metrics = {run: metrics_of(root, config, run) for run in TRAINED}
    records = json.loads(metrics["s1"].read_text())
    for record in records:
        if "avg_test_loss" in record:
            record["avg_test_loss"] += 1.0
    metrics["s3"] = tmp_path / "s3-metrics.json"
    metrics["s3"].write_text(json.dumps(records))
    metrics["lr"] = metrics["s1"]
    runs = {**SEEDS, "lr": {"seed": 1, "training": {"lr": 0.01}}}
    evaluations = {}
    for i, run in enumerate(runs):
        record = {"run_name": run, "tasks": [
            {"ptm": "<Phosphoserine>", "residue": "S", "sites": 30,
             "features": {name: {"auroc": value + 0.01 * i, "auroc_ci": [0.5, 0.9], "auprc": 0.4}
                          for name, value in (("ptm_mamba", 0.8), ("esm2", 0.7), ("onehot", 0.6))}}]}
        evaluations[run] = tmp_path / f"{run}.json"
        evaluations[run].write_text(json.dumps(record))
    record = compare(runs, metrics, evaluations)
    (group,) = record["groups"]  # the lr run is a group of its own: no mean ± sd row
    assert group["runs"] == list(SEEDS) and group["seeds"] == [1, 2, 3]
    losses = [r["metrics"]["test_loss"] for r in record["runs"][:3]]
    assert losses[2] == pytest.approx(losses[0] + 1.0)
    assert group["metrics"]["test_loss"]["sd"] == pytest.approx(statistics.stdev(losses))
    auroc = group["auroc"]["Phosphoserine (S)"]
    assert auroc["ptm_mamba"]["mean"] == pytest.approx(0.81) and auroc["ptm_mamba"]["sd"] == pytest.approx(0.01)
    assert auroc["onehot"]["n"] == 3
    write_outputs(record, layout.compare_outputs(tmp_path / "out"))
    rows = [line.split("\t") for line in (tmp_path / "out" / "compare.tsv").read_text().splitlines()]
    assert rows[0][-3:] == [f"auroc Phosphoserine (S) {name}" for name in ("ptm_mamba", "esm2", "onehot")]
    assert rows[0][:4] == ["run", "n", "seed", "training.lr"] and rows[4][:4] == ["lr", "1", "1", "0.01"]
    assert [row[0] for row in rows[1:]] == ["s1", "s2", "s3", "lr", "mean ± sd: s1, s2, s3"]
    assert "AUROC per PTM type" in (tmp_path / "out" / "compare.html").read_text()
    # an evaluation of another run is refused, in one line
    with pytest.raises(PipelineError, match="the evaluation of run 's1', not of run 's2'"):
        compare(runs, metrics, {**evaluations, "s2": evaluations["s1"]})


def test_the_report_shows_the_comparison(swept):
    root, config, _ = swept
    snakemake(root, config, "--report", "report.html")
    html = (root / "report.html").read_text(encoding="utf-8")
    for path in layout.compare_outputs().values():
        if path.suffix != ".json":
            assert f'"{path.as_posix()}"' in html, path
    assert "The runs of the sweep (config" in html and "System Message" not in html
    assert "PTM-Mamba sweep of 2 runs" in html and "the curves and tables of the other categories" in html


def test_the_shipped_sweep_is_three_seeds_stored_and_three_on_the_fly():
    """config/seeds.yaml, read over config/config.yaml as Snakemake reads a --configfile over the
    Snakefile's config file (section by section)."""
    from ptm_mamba.config import _merge, load_yaml_strict
    from ptm_mamba.config import settings_of_run

    config = validate(_merge(load_yaml_strict(REPO / "config" / "config.yaml"),
                             load_yaml_strict(REPO / "config" / "seeds.yaml")))
    runs = {name: settings_of_run(config, name) for name in config["runs"]}
    assert {name: (s.seed, s.training.precomputed) for name, s in runs.items()} == {
        f"{kind}_s{seed}": (seed, kind == "pre") for kind in ("pre", "otf") for seed in (42, 43, 44)}
    # otherwise the demo's settings: the same split, the same embeddings
    assert all(s.replace(seed=42, run_name="demo", training=runs["pre_s42"].training) ==
               runs["pre_s42"].replace(run_name="demo") for s in runs.values())
