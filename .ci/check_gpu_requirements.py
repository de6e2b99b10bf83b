"""Check a pip --report of ``requirements-gpu.txt`` + this package (see .ci/run), and the install
variants that CI cannot resolve.

Every pin of requirements-gpu.txt is exact and is what pip resolved, every dependency in
pyproject.toml has a pin, and torch came with NVIDIA's CUDA libraries (the CUDA build, not a
CPU wheel of the same version). The variants for other machines (requirements-cpu.txt,
requirements-cu12.txt) install from PyTorch's own wheel indexes, which CI cannot reach: each
must take the GPU set whole (``-r requirements-gpu.txt``) and change nothing but torch's build
tag, named by its index (``.../whl/cu128`` -> ``torch==2.13.0+cu128``). The dev extra (the
tests' set) pins the GPU set's torch and the Triton that torch brings on GPU machines, so the
Triton kernels are tested under the Triton users run.

    python .ci/check_gpu_requirements.py REPORT.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def name(requirement: str) -> str:
    """A requirement's project name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]).lower()


def pins() -> dict[str, str]:
    found = {}
    for number, line in enumerate((ROOT / "requirements-gpu.txt").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        project, sep, version = line.partition("==")
        if not sep or not version.strip() or any(c in version for c in "<>=!~*,;"):
            sys.exit(f"requirements-gpu.txt line {number}: {line!r} is not an exact pin (name==version)")
        found[name(project)] = version.strip()
    return found


def dependencies() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: no TOML reader in the standard library
        return []
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


VARIANTS = ("requirements-cpu.txt", "requirements-cu12.txt")
INDEX = re.compile(r"^--extra-index-url\s+https://download\.pytorch\.org/whl/(cpu|cu\d+)$")


def check_variant(file: str, pinned: dict[str, str]) -> str:
    """A variant pins what the GPU set pins, torch with its index's build tag; returns the tag."""
    lines = [line.split("#")[0].strip() for line in (ROOT / file).read_text().splitlines()]
    lines = [line for line in lines if line]
    tags = [m.group(1) for m in map(INDEX.match, lines) if m]
    if len(tags) != 1 or "-r requirements-gpu.txt" not in lines:
        sys.exit(f"{file}: needs one --extra-index-url https://download.pytorch.org/whl/TAG and "
                 "-r requirements-gpu.txt")
    for line in lines:
        if line.startswith("-"):
            continue
        project, _, version = line.split(";")[0].partition("==")
        want = f"{pinned.get(name(project))}+{tags[0]}" if name(project) == "torch" else pinned.get(name(project))
        if version.strip() != want:
            sys.exit(f"{file}: {line!r} differs from requirements-gpu.txt (want {name(project)}=={want})")
    return tags[0]


def dev_pin(project: str) -> str | None:
    """The dev extra's exact pin of ``project`` (None without one)."""
    try:
        import tomllib
    except ImportError:
        return None
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for requirement in extras["dev"]:
        if name(requirement) == project and "==" in requirement:
            return requirement.split("==", 1)[1].split(";")[0].strip()
    return None


def main(report_path: str) -> None:
    pinned = pins()
    unpinned = sorted({name(d) for d in dependencies()} - set(pinned))
    if unpinned:
        sys.exit(f"requirements-gpu.txt has no pin for {', '.join(unpinned)} (dependencies in pyproject.toml)")
    report = json.loads(Path(report_path).read_text())
    resolved = {name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    for project, version in pinned.items():
        if resolved.get(project) != version:
            sys.exit(f"requirements-gpu.txt pins {project}=={version}, pip resolved {resolved.get(project)}")
    cuda = sorted(p for p in resolved if p.startswith("nvidia-"))
    if not cuda or "+" in resolved["torch"]:
        sys.exit(f"torch {resolved['torch']} resolved without NVIDIA's CUDA libraries: not the CUDA build")
    tags = [check_variant(file, pinned) for file in VARIANTS]
    for project in ("torch", "triton"):
        if dev_pin(project) != resolved.get(project):
            sys.exit(f"pyproject.toml's dev extra pins {project}=={dev_pin(project)}; the GPU set installs "
                     f"{resolved.get(project)}: test what users run")
    variants = ", ".join(f"{file} (torch {pinned['torch']}+{tag})" for file, tag in zip(VARIANTS, tags))
    print(f"install variants agree with the GPU set: {variants}; dev extra: torch {pinned['torch']}, "
          f"triton {resolved.get('triton')}")
    print(f"GPU set resolves: {len(resolved)} packages; torch {resolved['torch']} with {len(cuda)} nvidia-* "
          f"packages (cuda-runtime {resolved.get('nvidia-cuda-runtime', '?')}, "
          f"cudnn {resolved.get('nvidia-cudnn-cu13', '?')}, nccl {resolved.get('nvidia-nccl-cu13', '?')}), "
          f"triton {resolved.get('triton', '?')}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
