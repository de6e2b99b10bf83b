"""The install variants stay in step with the tested GPU set: .ci/check_gpu_requirements.py.

CI resolves requirements-gpu.txt from PyPI; the CPU and CUDA 12 variants come from PyTorch's own
indexes, which CI cannot reach, so the check compares their pins with the GPU set's. Here the check
runs on copies of the repository's files, as they are and with one pin changed at a time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FILES = (".ci/check_gpu_requirements.py", "requirements-gpu.txt", "requirements-cpu.txt", "requirements-cu12.txt",
         "pyproject.toml")


def report_of_the_gpu_set() -> dict:
    """What pip --report says for the GPU set: its pins, the nvidia-* wheels torch brings, and its triton."""
    pins = dict(line.split("==") for line in (REPO / "requirements-gpu.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins.update({"nvidia-cuda-runtime": "13.0.96", "triton": "3.7.1"})
    return {"install": [{"metadata": {"name": k, "version": v}} for k, v in pins.items()]}


def check(tmp_path: Path, edit: tuple[str, str, str] | None = None) -> subprocess.CompletedProcess:
    for file in FILES:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / file, tmp_path / file)
    if edit:
        file, old, new = edit
        text = (tmp_path / file).read_text()
        assert old in text
        (tmp_path / file).write_text(text.replace(old, new))
    report = tmp_path / "report.json"
    report.write_text(json.dumps(report_of_the_gpu_set()))
    return subprocess.run([sys.executable, str(tmp_path / FILES[0]), str(report)], capture_output=True, text=True)


def test_the_repository_s_sets_agree(tmp_path):
    result = check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "requirements-cpu.txt (torch 2.13.0+cpu), requirements-cu12.txt (torch 2.13.0+cu128)" in result.stdout


@pytest.mark.parametrize("edit, says", [
    (("requirements-cu12.txt", "torch==2.13.0+cu128", "torch==2.12.0+cu128"), "want torch==2.13.0+cu128"),
    (("requirements-cpu.txt", "torch==2.13.0+cpu", "torch==2.13.0+cu128"), "want torch==2.13.0+cpu"),
    (("requirements-cu12.txt", "-r requirements-gpu.txt", "numpy==2.4.6"), "-r requirements-gpu.txt"),
    (("requirements-cpu.txt", "-r requirements-gpu.txt", "-r requirements-gpu.txt\nnumpy==1.26.4"),
     "want numpy==2.4.6"),
    (("pyproject.toml", "triton==3.7.1", "triton==3.9.0"), "dev extra pins triton==3.9.0; the GPU set installs 3.7.1"),
])
def test_a_variant_that_drifts_from_the_gpu_set_fails(tmp_path, edit, says):
    result = check(tmp_path, edit)
    assert result.returncode != 0 and says in result.stderr, result.stderr


def test_the_user_install_has_what_snakemake_report_needs():
    """`snakemake --report` imports the packages of Snakemake's "reports" extra (pygments) only when it
    runs; the dev extra's pytest brings pygments too, so a test run would not notice a user install
    (`pip install -r requirements-gpu.txt -e .`) without it."""
    import importlib.metadata
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = {re.split(r"[\s<>=!~;\[(]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    needed = {re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower()
              for r in importlib.metadata.requires("snakemake") or [] if re.search(r"extra\s*==\s*.reports.", r)}
    assert needed and needed <= ours, needed - ours
