"""The `predictions` target: a dry run plans training, then one `ptm-mamba predict` job per file of
predict.inputs on the run's best.ckpt. (The jobs themselves run the CLI tested in
test_import_original.py; a full run of the tiny workflow to predictions takes ~40 s, so it is not
repeated here.)"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, tiny_config, write_config
from ptm_mamba import layout

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]


def dry_run(root, *args):
    return subprocess.run([*SNAKEMAKE, "-n", "-p", *args, "--directory", str(root),
                           "--configfile", str(root / "config.yaml")], capture_output=True, text=True, timeout=300)


def project(root, inputs, pooled=True):
    config = tiny_config(root)
    config["predict"] = {"inputs": [str(root / name) for name in inputs], "pooled": pooled}
    for name in inputs:
        (root / name).write_text(">x\nMK<Phosphoserine>V\n")
    write_config(root / "config.yaml", **config)
    return config


def test_predictions_plans_training_then_one_predict_job_per_input(tmp_path):
    config = project(tmp_path, ["a.fasta", "b b.fa"], pooled=False)
    result = dry_run(tmp_path, "predictions")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    run = layout.run_dir(config["training"]["output_dir"], "tiny")
    for name in ("a", "b b"):
        assert (f"ptm-mamba predict --checkpoint {run / layout.BEST_CKPT}" in out
                and str(layout.prediction_path("tiny", name)) in out), name
    assert out.count("--no-pooled --max_tokens_per_batch 8192 --no-progress") == 2
    jobs = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert jobs["predict"] == 2 and jobs["train"] == 1


def test_inputs_that_would_write_the_same_file_are_refused(tmp_path):
    (tmp_path / "other").mkdir()
    project(tmp_path, ["a.fasta", "other/a.csv"])
    result = dry_run(tmp_path, "predictions")
    assert result.returncode != 0
    assert "predict.inputs:" in result.stderr and "would both write results/predictions/tiny/a.h5" in result.stderr
