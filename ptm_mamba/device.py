"""Where a stage runs, and why a GPU that was asked for cannot be used.

With ``device: auto`` a stage takes a GPU when torch can use one, else the CPU, *unless* the
config or the job (SLURM's GPU variables, ``CUDA_VISIBLE_DEVICES``) asked for a GPU: then no usable
GPU is a one-line error saying why and what to install, never a whole time limit at CPU speed.
:func:`cuda_facts` asks the driver itself, without initialising CUDA in torch.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import PipelineError
from .settings import Settings

# SLURM's variables for a job (step) given GPUs: counts, optionally typed ("a100:2", "2", "gpu:1").
SLURM_GPU_COUNTS = ("SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
# ... and device index lists ("0,1"), where "0" is a GPU too.
GPU_LISTS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")

# The oldest Linux driver branch for each CUDA major release (CUDA's minor-version compatibility).
MIN_DRIVER = {12: "R525", 13: "R580"}
# The pinned GPU sets, by the CUDA major of the torch build they install (README: "Install").
REQUIREMENTS = {12: "requirements-cu12.txt", 13: "requirements-gpu.txt"}


def _asks_for_gpus(name: str, value: str) -> bool:
    value = value.strip()
    if name in GPU_LISTS:
        return value not in ("", "-1", "NoDevFiles")
    counts = [part.rsplit(":", 1)[-1] for part in value.split(",") if part.strip()]
    return any(not c.isdigit() or int(c) > 0 for c in counts)  # "a100" alone means one


def job_gpu_requests(env: Mapping[str, str] = os.environ) -> list[str]:
    return [f"{name}={env[name]}" for name in (*SLURM_GPU_COUNTS, *GPU_LISTS)
            if name in env and _asks_for_gpus(name, env[name])]


def config_gpu_requests(settings: Settings) -> list[str]:
    asked = []
    if settings.device == "cuda":
        asked.append("device: cuda")
    precision = settings.training.mixed_precision
    if precision in ("bf16", "fp16"):
        asked.append(f"training.mixed_precision: {precision}")
    scan = settings.model.scan
    if scan in ("triton", "fused"):
        asked.append(f"model.scan: {scan}")
    return asked


@dataclass
class CudaFacts:
    """What torch was built for and what this machine's NVIDIA driver offers (None: not found)."""

    torch_version: str
    torch_cuda: str | None        # torch.version.cuda, None for a CPU-only build
    driver_version: str | None    # e.g. "550.54.15"
    driver_cuda: str | None       # the newest CUDA the driver supports, e.g. "12.4"
    usable: bool                  # torch.cuda.is_available()
    device_count: int
    visible_devices: str | None   # CUDA_VISIBLE_DEVICES
    host: str


def _driver_cuda() -> str | None:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _driver_version() -> str | None:
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        buf = ctypes.create_string_buffer(96)
        if nvml.nvmlInit_v2() == 0 and nvml.nvmlSystemGetDriverVersion(buf, 96) == 0:
            return buf.value.decode()
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", fh.read())
        return found.group(1) if found else None
    except OSError:
        return None


def cuda_facts() -> CudaFacts:
    usable = torch.cuda.is_available()
    return CudaFacts(torch_version=torch.__version__, torch_cuda=torch.version.cuda,
                     driver_version=_driver_version(), driver_cuda=_driver_cuda(), usable=usable,
                     device_count=torch.cuda.device_count() if usable else 0,
                     visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), host=socket.gethostname())


def _major(version: str) -> int:
    return int(version.split(".")[0])


def why_no_gpu(facts: CudaFacts) -> str:
    """Why torch cannot use a GPU here, and what to do about it (one sentence)."""
    torch_name = f"torch {facts.torch_version}"
    if facts.torch_cuda is None:
        return (f"{torch_name} is a CPU-only build: install a CUDA build (nvidia-smi shows the driver's CUDA "
                f"version; 13.x: pip install -r {REQUIREMENTS[13]}, 12.x: pip install -r {REQUIREMENTS[12]})")
    built = _major(facts.torch_cuda)
    needs = f"{torch_name} is built for CUDA {facts.torch_cuda} (NVIDIA driver {MIN_DRIVER.get(built, '?')} or newer)"
    if facts.driver_cuda is None and facts.driver_version is None:
        return f"{needs} but no NVIDIA driver is loaded on {facts.host}: run on a GPU node (nvidia-smi lists its GPUs)"
    driver = f"driver {facts.driver_version or '?'}" + (f" (CUDA {facts.driver_cuda})" if facts.driver_cuda else "")
    if facts.driver_cuda is not None and _major(facts.driver_cuda) < built:
        fit = REQUIREMENTS.get(_major(facts.driver_cuda))
        fix = (f"pip install -r {fit} (torch for CUDA {_major(facts.driver_cuda)}), or update the driver"
               if fit else "ask for a driver update: this torch has no build for so old a driver")
        return f"{needs}, but {facts.host} has {driver}: {fix}"
    visible = "" if facts.visible_devices is None else f", CUDA_VISIBLE_DEVICES={facts.visible_devices!r}"
    return (f"{needs} and {facts.host} has {driver}, but torch sees no GPU{visible}: check the job's GPU "
            "allocation (nvidia-smi) and the driver (torch.cuda.init() says more)")


def choose_device(setting: str | None, asked_by: list[str], stage: str, facts: CudaFacts | None = None,
                  cpu_option: str = "set device: cpu") -> torch.device:
    """The device ``stage`` runs on; ``asked_by``: config keys that asked for a GPU; ``cpu_option``:
    how the user says "the CPU" to this stage."""
    setting = setting or "auto"
    if setting == "cpu":
        return torch.device("cpu")
    asked = ([f"device: {setting}"] if setting != "auto" and f"device: {setting}" not in asked_by else []) \
        + list(asked_by) + job_gpu_requests()
    facts = facts or cuda_facts()
    if facts.usable:
        if setting in ("auto", "cuda"):  # under a launcher, each process its own GPU
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device(setting)
    if not asked:
        return torch.device("cpu")
    raise PipelineError(f"{stage}: a GPU was asked for ({', '.join(asked)}) but cannot be used: "
                        f"{why_no_gpu(facts)}; or {cpu_option} to run on the CPU")


def describe(device: torch.device | str) -> dict:
    """What runs where, JSON-plain: the device, its GPU, the driver and CUDA runtime, bf16 support."""
    device = torch.device(device)
    facts = cuda_facts() if device.type == "cuda" else None
    info = {"device": str(device), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    if facts is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(gpu=torch.cuda.get_device_name(index), gpus=facts.device_count,
                    driver=facts.driver_version, driver_cuda=facts.driver_cuda,
                    bf16=torch.cuda.is_bf16_supported())
    return info


def summary(info: dict) -> str:
    """One line for a log: ``cuda:0 (NVIDIA H100, driver 580.65, CUDA 13.0, bf16)`` or ``cpu (torch …)``."""
    if "gpu" not in info:
        return f"{info['device']} (torch {info['torch']})"
    return (f"{info['device']} ({info['gpu']}, driver {info['driver']}, CUDA runtime {info['cuda_runtime']}, "
            f"bf16 {'yes' if info['bf16'] else 'no'}; torch {info['torch']})")

