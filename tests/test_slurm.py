"""The tiny DAG on a real single-node SLURM cluster through profiles like profiles/slurm.

The cluster comes from Debian's packages (scripts/slurm/install.sh, run by
.ci/run) and is started here by scripts/slurm/start.sh; the test stops only the
daemons it started. Skipped where SLURM is not installed or we are not root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.slow
SCRIPTS = REPO / "scripts" / "slurm"


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("slurmctld") is None and not Path("/usr/sbin/slurmctld").exists():
        pytest.skip("SLURM is not installed (bash scripts/slurm/install.sh)")
    if os.geteuid() != 0:
        pytest.skip("starting a local SLURM cluster needs root")
    was_running = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
    started = subprocess.run(["bash", str(SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    yield started.stdout.strip()
    if not was_running:
        subprocess.run(["bash", str(SCRIPTS / "stop.sh")], capture_output=True, timeout=120)


def test_tiny_dag_runs_on_slurm(cluster, tmp_path):
    config = tiny_config(tmp_path, n=40, run_name="slurm", training={"embeddings_dir": "embeddings",
                                                                     "output_dir": "outputs"})
    write_config(tmp_path / "config.yaml", **config)
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                             "--profile", str(REPO / "tests" / "slurm_profile"), "--workflow-profile", "none",
                             "--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")],
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    job_ids = set(re.findall(r"SLURM jobid (\d+)", output))
    # split, 6 embedding shards, 3 gathers, train, plots, run_config: every job went through SLURM
    assert len(job_ids) == 13, output[-3000:]
    run = tmp_path / "outputs" / "ptm-mamba-slurm"
    for name in ("config.yaml", "split_mapping.json", "metrics.json", "best.ckpt", "last.ckpt"):
        assert (run / name).is_file()
    assert (tmp_path / "results" / "report" / "slurm" / "loss.png").is_file()
    print(f"SLURM DAG: {len(job_ids)} jobs in {time.time() - started:.0f} s")
