"""Check a pip --report of ``requirements-gpu.txt`` + this package (see .ci/run).

Every pin of requirements-gpu.txt is exact and is what pip resolved, every dependency in
pyproject.toml has a pin, and torch came with NVIDIA's CUDA libraries (the CUDA build, not a
CPU wheel of the same version).

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
    print(f"GPU set resolves: {len(resolved)} packages; torch {resolved['torch']} with {len(cuda)} nvidia-* "
          f"packages (cuda-runtime {resolved.get('nvidia-cuda-runtime', '?')}, "
          f"cudnn {resolved.get('nvidia-cudnn-cu13', '?')}, nccl {resolved.get('nvidia-nccl-cu13', '?')}), "
          f"triton {resolved.get('triton', '?')}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
