"""The Snakemake workflow end to end on tiny data: split -> embed -> train, reruns, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # targets first: --configfile takes every word after it
    result = subprocess.run([*SNAKEMAKE, *args, "--directory", str(workdir), "--configfile",
                             str(workdir / "config.yaml")], capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def planned(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Jobs per rule from a dry run's job table."""
    jobs, table = {}, False
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("job ") and "count" in line:
            table = True
            continue
        if table:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
                jobs[parts[0]] = int(parts[1])
            elif parts and parts[0] == "total":
                break
    return jobs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workflow")
    config = tiny_config(root, n=48, run_name="wf", training={"embeddings_dir": "embeddings",
                                                             "output_dir": "outputs"})
    write_config(root / "config.yaml", **config)
    snakemake(root)
    return root


def test_full_dag_runs_and_writes_the_seed_outputs(workdir):
    run = workdir / "outputs" / "ptm-mamba-wf"
    for name in ("config.yaml", "split_mapping.json", "metrics.json", "best.ckpt", "last.ckpt"):
        assert (run / name).is_file(), name
    for split in ("train", "val", "test"):
        assert (workdir / "embeddings" / f"{split}_embeddings.h5").is_file()
    assert (workdir / "logs" / "split.log").is_file()
    assert (workdir / "logs" / "train" / "wf.log").is_file()


def test_rerun_does_nothing(workdir):
    result = snakemake(workdir, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_a_training_parameter_reruns_only_training(workdir):
    import yaml

    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["training"]["lr"] = 1e-3
    (workdir / "changed.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--configfile",
                             str(workdir / "changed.yaml"), "-n"], capture_output=True, text=True, timeout=300)
    assert planned(result) == {"all": 1, "train": 1, "plots": 1, "run_config": 1}, result.stdout


def test_deleting_one_shard_reruns_only_that_shard_and_the_gather(workdir):
    (workdir / "embeddings" / "shards" / "val" / "1-of-2.h5").unlink()
    result = snakemake(workdir, "embeddings")
    out = result.stdout + result.stderr
    assert "rule embed_shard:" in out.replace("localrule", "rule")
    assert out.count("embed_shard:") == 1 and out.count("gather_embeddings:") == 1, out
    assert "rule split" not in out.replace("localrule", "rule")


def test_interrupted_training_resumes_under_snakemake(tmp_path):
    config = tiny_config(tmp_path, n=48, run_name="kill", training={
        "embeddings_dir": "embeddings", "output_dir": "outputs", "max_steps": 12, "log_steps": 3})
    write_config(tmp_path / "config.yaml", **config)
    snakemake(tmp_path, "embeddings")
    state = tmp_path / "outputs" / "ptm-mamba-kill" / "resume" / "state.ckpt"
    proc = subprocess.Popen([*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the training job, as a crash or a scancel would
    proc.wait()
    snakemake(tmp_path, "--unlock")  # a killed Snakemake leaves its lock, as the message tells the user
    snakemake(tmp_path)  # rerun-incomplete comes from profiles/default
    log = (tmp_path / "logs" / "train" / "kill.log").read_text()
    assert "resumed from" in log
    assert (tmp_path / "outputs" / "ptm-mamba-kill" / "last.ckpt").is_file()
