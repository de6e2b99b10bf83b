"""The tiny DAG on a real single-node SLURM cluster through a profile like profiles/slurm, with a
train job longer than its SLURM time limit: stopped by SLURM, resubmitted by Snakemake, resumed.

The cluster comes from Debian's packages (scripts/slurm/install.sh, run by
.ci/run) and is started here by scripts/slurm/start.sh; the test stops only the
daemons it started. Skipped where SLURM is not installed or we are not root.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, settings_for, slurm_installed, tiny_config, write_config
from ptm_mamba.embedding_store import EmbeddingReader
from ptm_mamba.layout import (BEST_CKPT, LAST_CKPT, METRICS_FILE, RESUME_DIR, RUN_FILES, SPLIT_DIR, SPLITS, report_dir,
                              report_files, run_dir, split_store_path)
from ptm_mamba.train import without_throughput
from test_train_features import train_here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(local_slurm):
    if not slurm_installed():
        pytest.skip("SLURM is not installed (bash scripts/slurm/install.sh)")
    if not local_slurm:
        pytest.skip("starting a local SLURM cluster needs root")


# The resubmission is forced by construction, with a margin on both sides instead of a bet on the
# machine's speed: the first train job has a 2-minute limit and gets its warning signal 60 s before it,
# i.e. 60 s in, long after the start-up (~10 s here; ~30 s with the rest of the suite beside it) and
# long before the end of a training timed at TRAINING_SECONDS (it would have to run 2.2 times faster
# than when it was timed to end first). Later jobs get 10 minutes (the signal 5 s before): one
# resubmission on a fast or a loaded machine alike.
TRAINING_SECONDS = 120
FIRST_RUNTIME, FIRST_SIGNAL = 2, "--signal=TERM@60"
LATER_RUNTIME, LATER_SIGNAL = 10, "--signal=TERM@5"
PROBE_STEPS = 150


def steps_for(seconds: float, config: dict, tmp_path) -> int:
    """Training steps that take ``seconds`` here: timed on a short run of the same model on the same
    data, split and embedded in this process."""
    from ptm_mamba.embed import embed_all
    from ptm_mamba.split import run_split

    probe = copy.deepcopy(config)
    probe["training"].update(max_steps=PROBE_STEPS, output_dir=str(tmp_path / "probe"),
                             embeddings_dir=str(tmp_path / "probe" / "embeddings"))
    run_split(settings_for(probe), tmp_path / "probe" / "split")
    embed_all(settings_for(probe), tmp_path / "probe" / "split", probe["training"]["embeddings_dir"])
    started = time.perf_counter()
    train_here(probe, tmp_path / "probe" / "split", "probe")
    return int(seconds * PROBE_STEPS / (time.perf_counter() - started))


def slurm_job_state(job_id: str) -> str:
    """JobState of a job SLURM still remembers (MinJobAge=300 s in start.sh's config)."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    found = re.search(r"JobState=(\S+)", shown)
    return found.group(1) if found else "?"


def wait_for_files(paths: list[Path], proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()[0][-6000:]
        assert time.time() < deadline, f"waited {timeout} s for {paths}"
        time.sleep(1)


def test_dag_on_slurm_with_a_train_job_past_its_time_limit(cluster, tmp_path):
    """The tiny DAG through SLURM: split, one embed job and one gather (it copies the data) per split (the
    light rules run locally), and a train job with runtime 2 (minutes, SLURM's unit) for a training of more
    than that. SLURM stops it (its warning signal before the limit, as profiles/slurm sends),
    the training saves its state, Snakemake resubmits the job (preemptible-retries) and the
    resubmitted job continues; the end result is the uninterrupted run's, to the bit."""
    config = tiny_config(tmp_path, n=40, run_name="slurm", embedding={"shards": 1, "dtype": "int8"}, training={
        "num_train_epochs": 1000, "log_steps": 100, "embeddings_dir": "embeddings", "output_dir": "outputs"})
    config["training"]["max_steps"] = steps = steps_for(TRAINING_SECONDS, config, tmp_path)
    write_config(tmp_path / "config.yaml", **config)
    profile = yaml.safe_load((REPO / "tests" / "slurm_profile" / "config.yaml").read_text())
    assert "--signal=TERM@" in profile["set-resources"]["train"]["slurm_extra"]  # as profiles/slurm
    profile["set-resources"]["train"]["runtime"] = f"{FIRST_RUNTIME} if attempt == 1 else {LATER_RUNTIME}"
    profile["set-resources"]["train"]["slurm_extra"] = f"'{FIRST_SIGNAL}' if attempt == 1 else '{LATER_SIGNAL}'"
    profile["set-threads"] = {"train": 1}  # OMP_NUM_THREADS=1: the numbers depend on the thread count
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    run = run_dir(tmp_path / "outputs", "slurm")
    started = time.time()
    snakemake = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--profile",
         str(tmp_path / "profile"), "--workflow-profile", "none", "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Meanwhile, once the workflow's split and embeddings are there, the uninterrupted run on them,
    # in this process, on one thread.
    embeddings = tmp_path / "embeddings"
    wait_for_files([split_store_path(embeddings, split) for split in SPLITS], snakemake)
    reference = copy.deepcopy(config)
    reference["training"].update(output_dir=str(tmp_path / "reference"), embeddings_dir=str(embeddings))
    ref = train_here(reference, tmp_path / SPLIT_DIR, "slurm")
    reference_seconds = time.time() - started

    output = snakemake.communicate(timeout=900)[0]
    assert snakemake.returncode == 0, output[-6000:]
    submitted = re.findall(r"SLURM jobid (\d+) \(log: \S+/rule_(\w+)/", output)
    by_rule = {rule: [job for job, r in submitted if r == rule] for _, rule in submitted}
    # split, one embed job and one gather per split, train, evaluate_run: through SLURM; the light rules are localrules
    assert sorted(by_rule) == ["embed_shard", "evaluate_run", "gather_embeddings", "split", "train"], submitted
    assert len(by_rule["embed_shard"]) == len(by_rule["gather_embeddings"]) == 3, submitted
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    with EmbeddingReader(split_store_path(embeddings, "train")) as store:  # int8 stores through the whole DAG
        assert store.dtype == "int8" and store.read(store.ids[0], 0).scales is not None
    assert report_files(tmp_path / report_dir("slurm"))["loss"].is_file()

    jobs = by_rule["train"]
    states = [slurm_job_state(job) for job in jobs]
    # the first was stopped by its warning signal (it saved its state and failed), by construction; the
    # second finishes (on a heavily loaded machine a later one: each was stopped the same way)
    assert len(states) >= 2 and states[-1] == "COMPLETED", (states, output[-4000:])
    assert set(states[:-1]) <= {"FAILED", "TIMEOUT"}, (states, output[-4000:])
    for job in jobs[:-1]:  # Snakemake's job process in the job step outlived the signal: it exited, after
        # the training (SLURM would have killed the rest of the step with it), not by the signal
        # the plugin's log folder: rule_train/, and below it a folder per wildcard value (the run's name)
        slurm_log, = (tmp_path / ".snakemake" / "slurm_logs" / "rule_train").rglob(f"{job}.log")
        slurm_log = slurm_log.read_text()
        assert re.search(r"task 0: Exited with exit code 1\b", slurm_log), slurm_log[-3000:]
    # Snakemake deleted the first job's log before resubmitting; the segments log has both, in order
    log = (tmp_path / "logs" / "train" / "slurm.segments.log").read_text()
    assert log.count(" a segment of this run ====") == len(jobs), log[-3000:]
    assert log.index("error: stopped by SIGTERM at step") < log.index("resumed from"), log[-3000:]
    assert log.endswith((tmp_path / "logs" / "train" / "slurm.log").read_text())
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < steps, log[-3000:]
    assert without_throughput(json.loads((run / METRICS_FILE).read_text())) == \
        without_throughput(json.loads((ref / METRICS_FILE).read_text()))
    for name in (BEST_CKPT, LAST_CKPT):
        mine, theirs = (torch.load(r / name, weights_only=True)["model"] for r in (run, ref))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert not (run / RESUME_DIR).exists()
    print(f"SLURM DAG: {len(submitted)} jobs; {steps} steps in {len(jobs)} train jobs ({', '.join(states)}), "
          f"resumed at step {resumed.group(1)}; {time.time() - started:.0f} s in all, the uninterrupted run "
          f"{reference_seconds:.0f} s")
