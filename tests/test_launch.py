"""How the train rule launches training (ptm_mamba/launch.py), without SLURM and without GPUs.

- the command the rule runs: one machine as before (accelerate launch, one process per GPU);
  training.num_machines > 1 one SLURM job over that many nodes (srun, one task per node, accelerate's
  multi-node launch with the node's rank and the first node as the main process);
- two "machines" on this host, one process each (gloo), train together: both ranks' batches are in
  every step and every validation, and the result is the 2-process single-machine run's, exactly;
- SLURM signals every process of a job step: the launcher outlives the training processes, which
  save their state on SIGTERM, and ends with their status (143).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, settings_for, tiny_config, write_config
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import METRICS_FILE, RESUME_DIR, run_dir, split_csv
from ptm_mamba.launch import accelerate_args, launch_command, rendezvous, slurm_resources
from ptm_mamba.train import without_throughput


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(machines: int, processes: int, config: Path, split: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "ptm_mamba.launch", "--num_machines", str(machines), "--num_processes",
            str(processes), "--", "-m", "ptm_mamba", "train", "--config", str(config), "--split_dir", str(split),
            "--run_name", name, "--no_progress"]


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "MACHINE_RANK"))}
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the rule runs `python`
    return {**clean, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


# ----------------------------------------------------------------------------- the command

def test_one_machine_is_accelerate_launch_as_before():
    assert launch_command(1, 4) == "exec python -m ptm_mamba.launch --num_machines 1 --num_processes 4 --"
    assert launch_command(1, 4, log="logs/train/a b.log") == ("exec python -m ptm_mamba.launch --num_machines 1 "
                                                              "--num_processes 4 --log 'logs/train/a b.log' --")
    assert accelerate_args(1, 1, {}) == ["--num_machines", "1", "--num_processes", "1", "--dynamo_backend", "no",
                                         "--mixed_precision", "no"]
    assert accelerate_args(1, 4, {}) == ["--num_machines", "1", "--num_processes", "4", "--dynamo_backend", "no",
                                         "--mixed_precision", "no", "--multi_gpu"]
    assert slurm_resources(1, 4) == {"gpu": 4}


def test_several_machines_are_one_task_per_node_with_the_first_node_as_main():
    command = launch_command(3, 4)
    assert command.startswith("exec srun --nodes=3 --ntasks=3 --ntasks-per-node=1 ")
    assert command.endswith(" python -m ptm_mamba.launch --num_machines 3 --num_processes 4 --")
    assert slurm_resources(3, 4) == {"gpu": 0, "gres": "gpu:4", "nodes": 3, "tasks": 3, "mpi": "srun"}
    slurm = {"SLURM_NODEID": "2", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_ID": "4242", "MASTER_ADDR": "gpu01"}
    assert accelerate_args(3, 4, slurm) == [
        "--num_machines", "3", "--num_processes", "12", "--dynamo_backend", "no", "--mixed_precision", "no",
        "--machine_rank", "2",
        "--main_process_ip", "gpu01", "--main_process_port", str(29500 + 4242), "--multi_gpu"]


def test_several_machines_outside_slurm_or_in_a_job_of_another_size_are_one_line_errors():
    with pytest.raises(PipelineError, match=r"^training.num_machines: 2 runs as one SLURM job over 2 nodes"):
        rendezvous(2, {})
    with pytest.raises(PipelineError, match=r"^training.num_machines is 2, but the SLURM job has 1 node"):
        rendezvous(2, {"SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1"})
    result = subprocess.run([sys.executable, "-m", "ptm_mamba.launch", "--num_machines", "2", "--num_processes",
                             "1", "--", "-m", "ptm_mamba", "train"], capture_output=True, text=True, env=env())
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: training.num_machines: 2 runs as one SLURM job"), result.stderr


def test_the_train_rule_runs_the_launch_command_with_the_resources_it_needs(tmp_path):
    config = tiny_config(tmp_path, training={"num_machines": 2, "num_processes": 4, "use_esm": False})
    write_config(tmp_path / "config.yaml", **config)
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n",
                             "-p", "--workflow-profile", "none", "--directory", str(tmp_path), "--configfile",
                             str(tmp_path / "config.yaml")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train = result.stdout[result.stdout.index("rule train:"):]
    assert "gpu=0, gres=gpu:4, nodes=2, tasks=2, mpi=srun" in train.split("Shell command:")[0]
    launch = launch_command(2, 4, log="logs/train/tiny.log")
    assert re.search(rf"Shell command: OMP_NUM_THREADS=\d+ {re.escape(launch)} -m ptm_mamba train ", train)


# ----------------------------------------------------------------------------- two machines on one host

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[dict, Path, Path]:
    from ptm_mamba.split import run_split

    root = tmp_path_factory.mktemp("launch")
    config = tiny_config(root, n=40, training={"use_esm": False, "max_steps": 4, "log_steps": 2,
                                               "per_device_train_batch_size": 3})
    run_split(settings_for(config), root / "split")
    return config, write_config(root / "config.yaml", **config), root / "split"


@pytest.mark.slow
def test_two_machines_train_like_two_processes_on_one(project):
    from ptm_mamba.batching import epoch_batches, plan_batches
    from ptm_mamba.data import BatchBuilder
    from ptm_mamba.split import read_split

    config, path, split = project
    port = str(free_port())
    machines = [subprocess.Popen(launch(2, 1, path, split, "two-machines"), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True,
                                 env=env(MACHINE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                for rank in (0, 1)]
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    for machine, output in zip(machines, outputs):
        assert machine.returncode == 0, output[-4000:]
    assert "--num_machines 2 --num_processes 2 --dynamo_backend no --mixed_precision no --machine_rank 1" in outputs[1]
    assert "on 2 processes" in outputs[0]

    one = subprocess.run(launch(1, 2, path, split, "one-machine"), capture_output=True, text=True, timeout=600,
                         env=env(MASTER_PORT=str(free_port())))
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    out = Path(config["training"]["output_dir"])
    two = without_throughput(json.loads((run_dir(out, "two-machines") / METRICS_FILE).read_text()))
    assert two == without_throughput(json.loads((run_dir(out, "one-machine") / METRICS_FILE).read_text()))

    # every step counts the tokens of both ranks' batches (batches 2k and 2k+1 of the epoch) ...
    steps = [m for m in two if "train_loss" in m]
    assert [m["Step"] for m in steps] == [1, 2, 3, 4]
    train = BatchBuilder(read_split(split_csv(split, "train")), max_sequence_length=1024, mask_prob=0.15,
                         random_mask_only_prob=0.2)
    batches = epoch_batches(train.lengths, 3000, 3, seed=config["seed"], epoch=0, world_size=2)
    assert steps[0]["tokens"] == sum(train.lengths[i] for b in batches[:2] for i in b)
    assert len(set(map(tuple, batches[:2]))) == 2  # two different batches: the machines did not repeat each other
    # ... and each validation scores all of the split's batches, each once, over both machines
    val = BatchBuilder(read_split(split_csv(split, "val")), max_sequence_length=1024, mask_prob=0.15,
                       random_mask_only_prob=0.2)
    n_val = len(plan_batches(val.lengths, 3000, 3))
    assert n_val >= 2
    for step in (2, 4):
        assert sorted(m["batch"] for m in two if "val_loss" in m and m["Step"] == step) == list(range(n_val))


# ----------------------------------------------------------------------------- signals as SLURM sends them

def process_tree(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                children.append(int(entry))
    return [pid] + [p for child in children for p in process_tree(child)]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_launcher_outlives_the_training_it_started_when_every_process_gets_sigterm(project, processes):
    """The rule's command as Snakemake runs it (bash -c, exec), SIGTERM to every process at once:
    the training saves its state, and the launcher ends only after it, with its status."""
    config, path, split = project
    name = f"sigterm-{processes}"
    config = copy.deepcopy(config)
    config["training"]["max_steps"] = 100000  # never ends by itself
    path = write_config(path.with_name(f"{name}.yaml"), **config)
    run = run_dir(config["training"]["output_dir"], name)
    log = path.with_name(f"{name}.log")
    train = shlex.join(launch(1, processes, path, split, name)[-10:])  # -m ptm_mamba train ...
    log.write_text("the earlier segment's lines\n")
    # as the train rule runs it: the launcher shows the output and appends it to the log
    shell = subprocess.Popen(["bash", "-c", f"set -euo pipefail; OMP_NUM_THREADS=1 "
                                            f"{launch_command(1, processes, log=str(log))} {train}"],
                             env=env(MASTER_PORT=str(free_port())), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + 300
    while not (run / RESUME_DIR / "state.ckpt").exists() and shell.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shell.poll() is None, log.read_text()[-3000:]
    tree = process_tree(shell.pid)
    assert len(tree) == 1 + processes, tree  # the launcher (accelerate, torch's agent, in-process) and workers
    for pid in tree:
        os.kill(pid, signal.SIGTERM)
    assert shell.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert not [pid for pid in tree[1:] if Path(f"/proc/{pid}").exists()]  # the training ended before it
    text, shown = log.read_text(), shell.stdout.read()
    assert text.count("error: stopped by SIGTERM at step") == processes, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.startswith("the earlier segment's lines\n==== ") and " a segment of this run ====" in text
    assert text.split(" a segment of this run ====\n", 1)[1] == shown  # the terminal saw what the log holds
    assert log.with_suffix(".segments.log").read_text() == text.removeprefix("the earlier segment's lines\n")
