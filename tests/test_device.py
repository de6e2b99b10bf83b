"""A GPU job runs on a GPU or stops: the device check of the embed, train and predict stages.

On this CPU machine torch is the CPU-only build, so a job that SLURM gave GPUs (its variables set
here as SLURM sets them), or a config that asks for a GPU, must stop with one line naming the cause;
without such a request the stages run on the CPU as before. The reasons for other machines (a CUDA
build on a driver too old for it, no driver, no device visible) are checked on the facts the check
reads from torch and the driver.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SEQS, error_line, run_cli, settings_for, write_config
from ptm_mamba import device as device_module
from ptm_mamba.device import CudaFacts, choose_device, config_gpu_requests, job_gpu_requests, why_no_gpu
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import PROVENANCE_FILE, run_dir, split_csv

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")

SLURM_JOB_WITH_A_GPU = {"SLURM_JOB_ID": "17", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_GPUS": "0",
                        "CUDA_VISIBLE_DEVICES": "0"}


@pytest.fixture
def slurm_gpu_job(monkeypatch):
    for name, value in SLURM_JOB_WITH_A_GPU.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def no_gpu_request(monkeypatch):
    for name in (*device_module.SLURM_GPU_COUNTS, *device_module.GPU_LISTS):
        monkeypatch.delenv(name, raising=False)


def test_each_stage_in_a_slurm_gpu_job_with_a_cpu_torch_stops_in_one_line(slurm_gpu_job, embedded_project,
                                                                          checkpoint, tmp_path):
    root, config = embedded_project
    cfg = write_config(tmp_path / "c.yaml", **{**config, "run_name": "gpu-job"})
    shard = tmp_path / "shard.h5"
    train = run_cli("train", "--config", cfg, "--split_dir", root / "split", "--no_progress")
    embed = run_cli("embed-shard", "--config", cfg, "--split", "val", "--split_file", split_csv(root / "split", "val"),
                    "--shard", "0", "--num_shards", "1", "--output", shard)
    fasta = tmp_path / "p.fasta"
    fasta.write_text(f">a\n{SEQS['a']}\n")
    predict = run_cli("predict", "--checkpoint", checkpoint, "--input", fasta, "--output", tmp_path / "h.h5")
    for stage, result, cpu in (("train", train, "set device: cpu"), ("embed", embed, "set device: cpu"),
                               ("predict", predict, "use --device cpu")):
        line = error_line(result, f"{stage}: a GPU was asked for", "SLURM_GPUS_ON_NODE=1", "CUDA_VISIBLE_DEVICES=0",
                          "CPU-only build", "pip install -r requirements-gpu.txt", cpu)
        assert torch.__version__ in line
    assert not run_dir(root / "outputs", "gpu-job").exists()  # nothing written
    assert not shard.exists() and not (tmp_path / "h.h5").exists()


def test_the_real_command_stops_too(slurm_gpu_job, embedded_project, tmp_path):
    """The installed entry point, in its own process, with the variables in its environment."""
    root, config = embedded_project
    cfg = write_config(tmp_path / "c.yaml", **{**config, "run_name": "gpu-job-2"})
    result = run_cli("train", "--config", cfg, "--split_dir", root / "split", own_process=True, timeout=120)
    error_line(result, "train: a GPU was asked for (SLURM_GPUS_ON_NODE=1, SLURM_JOB_GPUS=0, CUDA_VISIBLE_DEVICES=0)")


def test_device_cpu_runs_on_the_cpu_in_a_gpu_job(slurm_gpu_job, embedded_project, tmp_path):
    root, config = embedded_project
    cfg = write_config(tmp_path / "c.yaml", **{**config, "device": "cpu"})
    shard = tmp_path / "shard.h5"
    result = run_cli("embed-shard", "--config", cfg, "--split", "val", "--split_file", split_csv(root / "split", "val"),
                     "--shard", "0", "--num_shards", "1", "--output", shard)
    assert result.returncode == 0, result.stderr
    assert "ESM-2 runs on cpu" in result.stdout and shard.exists()


def test_without_a_request_the_stages_run_on_the_cpu_and_say_so(no_gpu_request, checkpoint, tmp_path):
    fasta = tmp_path / "p.fasta"
    fasta.write_text(f">a\n{SEQS['a']}\n")
    result = run_cli("predict", "--checkpoint", checkpoint, "--input", fasta, "--output", tmp_path / "h.h5",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"predict runs on cpu (torch {torch.__version__})" in result.stdout
    provenance = json.loads((checkpoint.parent / PROVENANCE_FILE).read_text())
    assert provenance["runtime"]["device"] == "cpu" and provenance["runtime"]["precision"] == "no"
    assert provenance["runtime"]["kernels"].startswith("torch")


@pytest.mark.parametrize("key, value, named", [
    ("device", "cuda", "device: cuda"),
    ("training.mixed_precision", "bf16", "training.mixed_precision: bf16"),
    ("training.mixed_precision", "fp16", "training.mixed_precision: fp16"),
    ("model.scan", "triton", "model.scan: triton"),
    ("model.scan", "fused", "model.scan: fused"),
])
def test_a_config_that_asks_for_a_gpu_stops_without_one(no_gpu_request, embedded_project, tmp_path, key, value,
                                                       named):
    root, config = embedded_project
    cfg = json.loads(json.dumps({**config, "run_name": "asks"}))
    section, _, name = key.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    assert config_gpu_requests(settings_for(cfg)) == [named]
    result = run_cli("train", "--config", write_config(tmp_path / "c.yaml", **cfg), "--split_dir", root / "split")
    error_line(result, f"train: a GPU was asked for ({named}) but cannot be used", "CPU-only build")
    assert not run_dir(root / "outputs", "asks").exists()


@pytest.mark.parametrize("env, asked", [
    ({}, []),
    ({"SLURM_JOB_ID": "3", "SLURM_CPUS_PER_TASK": "4"}, []),  # a CPU job
    ({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS": "0"}, []),
    ({"CUDA_VISIBLE_DEVICES": ""}, []),  # GPUs hidden on purpose
    ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
    ({"SLURM_JOB_GPUS": "0"}, ["SLURM_JOB_GPUS=0"]),  # GPU number 0
    ({"SLURM_GPUS": "a100:2"}, ["SLURM_GPUS=a100:2"]),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100"}, ["SLURM_GPUS_PER_NODE=gpu:a100"]),
    ({"SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": "GPU-8b3f"},
     ["SLURM_GPUS_PER_TASK=1", "CUDA_VISIBLE_DEVICES=GPU-8b3f"]),
])
def test_job_gpu_requests_as_slurm_sets_them(env, asked):
    assert job_gpu_requests(env) == asked


def facts(**kw) -> CudaFacts:
    base = dict(torch_version="2.13.0", torch_cuda="13.0", driver_version="580.65.06", driver_cuda="13.0",
                usable=False, device_count=0, visible_devices=None, host="gpu17")
    return CudaFacts(**{**base, **kw})


def test_the_reasons_for_machines_this_one_is_not():
    old = why_no_gpu(facts(driver_version="550.54.15", driver_cuda="12.4"))
    assert old == ("torch 2.13.0 is built for CUDA 13.0 (NVIDIA driver R580 or newer), but gpu17 has driver "
                   "550.54.15 (CUDA 12.4): pip install -r requirements-cu12.txt (torch for CUDA 12), or update "
                   "the driver")
    assert "no build for so old a driver" in why_no_gpu(facts(driver_version="470.82", driver_cuda="11.4"))
    assert why_no_gpu(facts(driver_version=None, driver_cuda=None)) == (
        "torch 2.13.0 is built for CUDA 13.0 (NVIDIA driver R580 or newer) but no NVIDIA driver is loaded on "
        "gpu17: run on a GPU node (nvidia-smi lists its GPUs)")
    hidden = why_no_gpu(facts(visible_devices=""))
    assert "torch sees no GPU, CUDA_VISIBLE_DEVICES=''" in hidden and "driver 580.65.06 (CUDA 13.0)" in hidden
    assert "CPU-only build" in why_no_gpu(facts(torch_version="2.13.0+cpu", torch_cuda=None))


def test_choose_device():
    usable = facts(usable=True, device_count=2)
    assert choose_device("auto", [], "train", usable) == torch.device("cuda", 0)
    assert choose_device("cpu", ["training.mixed_precision: bf16"], "train", facts()) == torch.device("cpu")
    with pytest.raises(PipelineError, match=r"^predict: a GPU was asked for \(device: cuda:1\) but cannot be used: "
                                            r"torch 2.13.0 is built for CUDA 13.0 .* or set device: cpu"):
        choose_device("cuda:1", [], "predict", facts(visible_devices=""))


def test_doctor_reports_this_machine(no_gpu_request):
    result = run_cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["torch"] == {"status": "ok", "value": f"{torch.__version__} (CPU-only build)", "fix": None}
    assert found["gpus"]["status"] == "missing" and found["nvidia driver"]["value"] == "not found"
    triton = pytest.importorskip("triton")
    assert found["triton"]["value"].startswith(triton.__version__) and found["triton"]["status"] == "ok"
    assert found["fused kernels"]["status"] == "missing" and "mamba-ssm not installed" in found["fused kernels"]["value"]
    assert found["mmseqs2"]["status"] == "ok" and found["slurm"]["status"] == "ok"  # .ci/run installs both
    assert found["device: auto"]["value"] == "cpu" and found["model.scan: auto"]["value"] == "torch"
    assert "no problems found" in run_cli("doctor").stdout


def test_doctor_in_a_gpu_job_without_a_usable_gpu_says_what_to_install(slurm_gpu_job):
    result = run_cli("doctor")
    assert result.returncode == 1
    assert "! gpus" in result.stdout and "none usable (asked for by SLURM_GPUS_ON_NODE=1" in result.stdout
    assert "fix: torch" in result.stdout and "pip install -r requirements-gpu.txt" in result.stdout
