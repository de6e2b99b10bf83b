"""Checkpoints: tensors and plain Python values only, written atomically.

``best.ckpt`` holds the model (weights, its config, the run config);
``last.ckpt`` and the resume state add the optimiser, the scheduler, the
position in training (epoch, batch, step) and the metrics so far. Every file
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .fileio import atomic_path

FORMAT_VERSION = 1


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, foreign pickle
        raise PipelineError(f"{path}: not a readable ptm-mamba checkpoint ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise PipelineError(f"{path}: not a ptm-mamba checkpoint (format_version {FORMAT_VERSION} expected)")
    return state
