"""Shared fixtures: small datasets and configs written to tmp folders, and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# Keep the test suite's torch use to the 2 cores we have, and quiet.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m ptm_mamba ARGS`` as a user would; capture its output."""
    return subprocess.run([sys.executable, "-m", "ptm_mamba", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write_config(path: Path, **sections) -> Path:
    """Write a config YAML whose sections are given as dicts."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def write_csv(path: Path, rows: list[tuple[str, str]], header=("unique_id", "ptm_seq")) -> Path:
    lines = [",".join(header)] + [",".join(f'"{c}"' if "," in c else c for c in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def toy_rows(n: int = 20) -> list[tuple[str, str]]:
    """A few valid proteins with PTM tokens, deterministic."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        body = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(20, 60)))
        rows.append((f"P{i:03d}", "M<N-acetylalanine>" + body[:10] + "<Phosphoserine>" + body[10:]))
    return rows


@pytest.fixture
def toy_config(tmp_path: Path) -> Path:
    data = write_csv(tmp_path / "data.csv", toy_rows())
    return write_config(tmp_path / "config.yaml",
                        dataset={"dataset_location": str(data), "val_size": 3, "test_size": 3})
