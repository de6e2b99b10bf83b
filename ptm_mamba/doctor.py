"""``ptm-mamba doctor``: what this machine offers the pipeline, and the command that fixes each problem.

Like ``accelerate env``, but for this pipeline. Each finding is ``ok``, ``missing`` (an optional
part that is not here) or ``problem`` (something asked for or installed that cannot work), with a ``fix``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata

import torch

from .device import cuda_facts, job_gpu_requests, why_no_gpu

# The fused path's build (README, "The fused CUDA kernels"): from source, against the installed torch.
FUSED_BUILD = ("MAMBA_FORCE_BUILD=TRUE MAMBA_KEEP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE "
               "pip install --no-build-isolation --no-binary mamba-ssm,causal-conv1d mamba-ssm causal-conv1d")


@dataclass
class Finding:
    name: str
    status: str  # ok, missing, problem
    value: str
    fix: str | None = None


def version_of(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def tested_version(package: str) -> str | None:
    """The version this project's tests pin for ``package`` (the dev extra), from the installed metadata."""
    for requirement in metadata.requires("ptm-mamba") or []:
        found = re.match(rf"{package}==([\w.+]+)", requirement)
        if found:
            return found.group(1)
    return None


def command_version(*command: str) -> str | None:
    """The first line a tool prints of its version, or None where it is not installed or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[-1].strip() if out.returncode == 0 and lines else None


def check_torch_and_gpus() -> list[Finding]:
    facts = cuda_facts()
    build = f"CUDA {facts.torch_cuda}" if facts.torch_cuda else "CPU-only build"
    found = [Finding("torch", "ok", f"{facts.torch_version} ({build})")]
    driver = (f"{facts.driver_version or '?'} (CUDA {facts.driver_cuda or '?'})"
              if facts.driver_version or facts.driver_cuda else "not found")
    found.append(Finding("nvidia driver", "ok" if driver != "not found" else "missing", driver))
    if facts.usable:
        names = [f"{torch.cuda.get_device_name(i)}" for i in range(facts.device_count)]
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
        found.append(Finding("gpus", "ok", f"{facts.device_count}: {', '.join(names)} ({bf16})"))
    elif facts.torch_cuda or driver != "not found" or job_gpu_requests():
        asked = f" (asked for by {', '.join(job_gpu_requests())})" if job_gpu_requests() else ""
        found.append(Finding("gpus", "problem", f"none usable{asked}", why_no_gpu(facts)))
    else:
        found.append(Finding("gpus", "missing", "none (CPU machine): stages run on the CPU"))
    return found


def check_triton(gpu: bool) -> Finding:
    from . import kernels, scan, scan_triton

    installed, tested = version_of("triton"), tested_version("triton")
    if installed is None:
        fix = f"pip install triton=={tested}" if gpu else None
        return Finding("triton", "problem" if gpu else "missing", "not installed", fix)
    label = f"{installed}" + (f" (tested: {tested})" if tested and tested != installed else "")
    reason = scan_triton.broken() or scan_triton.unavailable()
    if reason is not None and reason != "no CUDA GPU":
        return Finding("triton", "problem", f"{label}: {reason}", f"pip install --force-reinstall triton=={tested}")
    if not gpu:
        return Finding("triton", "ok", f"{label}; the Triton scan is not checked without a GPU")
    try:
        agrees = scan.triton_agrees("cuda")
    except Exception as exc:  # noqa: BLE001 - a compile or launch error is the finding
        return Finding("triton", "problem", f"{label}: the Triton scan does not compile or launch here "
                       f"({kernels.describe(exc)})", f"pip install triton=={tested}, or model.scan: torch")
    if not agrees:
        return Finding("triton", "problem", f"{label}: the Triton scan disagrees with the PyTorch scan here "
                       f"({kernels.what_ran()})", "model.scan: torch (and report the GPU and versions)")
    return Finding("triton", "ok", f"{label}; the Triton scan compiles and agrees with the PyTorch scan on "
                   f"{torch.cuda.get_device_name(0)}")


def check_fused(gpu: bool) -> list[Finding]:
    from .mamba_block import unavailable

    versions = {p: version_of(p) for p in ("mamba-ssm", "causal-conv1d")}
    value = ", ".join(f"{p} {v or 'not installed'}" for p, v in versions.items())
    if not any(versions.values()):
        return [Finding("fused kernels", "missing", f"{value}: the Triton scan is the GPU path",
                        f"optional, to build them: {FUSED_BUILD}" if gpu else None)]
    reason = unavailable("fused")
    if reason is None:
        return [Finding("fused kernels", "ok", f"{value}; the fused ops load")]
    if reason == "no CUDA GPU":
        return [Finding("fused kernels", "missing", f"{value}; not usable without a GPU")]
    return [Finding("fused kernels", "problem", f"{value}: {reason}", f"rebuild against this torch: {FUSED_BUILD}")]


def check_nvcc() -> Finding:
    line = command_version("nvcc", "--version")
    if line is None:
        return Finding("nvcc", "missing", "not found (needed only to build mamba-ssm's fused kernels)")
    found = re.search(r"cuda_(\d+)\.(\d+)", line) or re.search(r"release (\d+)\.(\d+)", line)
    nvcc_cuda = f"{found.group(1)}.{found.group(2)}" if found else "?"
    torch_cuda = torch.version.cuda
    if torch_cuda and found and found.group(1) != torch_cuda.split(".")[0]:
        return Finding("nvcc", "problem", f"CUDA {nvcc_cuda}, torch's is {torch_cuda}",
                       f"a CUDA {torch_cuda.split('.')[0]}.x toolkit to build mamba-ssm (its CUDA major must equal torch's)")
    return Finding("nvcc", "ok", f"CUDA {nvcc_cuda}")


def check_tools() -> list[Finding]:
    found = []
    mmseqs = command_version("mmseqs", "version")
    found.append(Finding("mmseqs2", "ok", mmseqs) if mmseqs else
                 Finding("mmseqs2", "missing", "not found (needed for dataset.split_by: cluster)",
                         "sudo scripts/install_mmseqs.sh (Debian's mmseqs2), or conda install -c bioconda mmseqs2"))
    slurm = command_version("sbatch", "--version")
    found.append(Finding("slurm", "ok", slurm) if slurm else
                 Finding("slurm", "missing", "not found (needed for snakemake --profile profiles/slurm)"))
    return found


def auto_choices(gpu: bool, findings: dict[str, Finding]) -> list[Finding]:
    from .mamba_block import unavailable

    if not gpu:
        scan = "torch"
    elif unavailable("fused") is None:
        scan = "fused"
    else:
        scan = "triton" if findings["triton"].status == "ok" else "torch"
    return [Finding("device: auto", "ok", "cuda" if gpu else "cpu"), Finding("model.scan: auto", "ok", scan)]


def doctor() -> list[Finding]:
    findings = check_torch_and_gpus()
    gpu = torch.cuda.is_available()
    findings += [check_triton(gpu), *check_fused(gpu), check_nvcc(), *check_tools()]
    findings += auto_choices(gpu, {f.name: f for f in findings})
    return findings


def report(findings: list[Finding]) -> str:
    width = max(len(f.name) for f in findings)
    lines = []
    for f in findings:
        mark = {"ok": "  ", "missing": "- ", "problem": "! "}[f.status]
        lines.append(f"{mark}{f.name:<{width}}  {f.value}")
        if f.fix:
            lines.append(f"  {'':<{width}}  fix: {f.fix}")
    problems = sum(f.status == "problem" for f in findings)
    lines.append(f"{problems} problem{'s' if problems != 1 else ''} found" if problems else "no problems found")
    return "\n".join(lines)


def as_json(findings: list[Finding]) -> dict:
    return {f.name: {k: v for k, v in asdict(f).items() if k != "name"} for f in findings}

