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


class _Writes:
    """A file for ``torch.save`` that keeps the OSError of a failed write: torch reports a full
    disk as ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...``."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically; a failed write (a full disk) is one line naming ``path``
    and its file system's free space (:class:`ptm_mamba.fileio.WriteError`), with no file left."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        out = _Writes(fh)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None  # the OSError: atomic_path names the target and the free space


def one_line(message: object, limit: int = 200) -> str:
    """``str(message)`` (an exception's, say) on one line, cut to ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state: ``model`` (named tensors), ``model_config`` (a mapping) and the rest."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, foreign pickle
        raise PipelineError(f"{path}: not a readable ptm-mamba checkpoint ({type(exc).__name__}: "
                            f"{one_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise PipelineError(f"{path}: not a ptm-mamba checkpoint (format_version {FORMAT_VERSION} expected)")
    weights = state["model"]
    if not (isinstance(weights, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())):
        raise PipelineError(f"{path}: damaged checkpoint: 'model' is not a mapping of names to tensors")
    if not isinstance(state.get("model_config"), dict):
        raise PipelineError(f"{path}: damaged checkpoint: 'model_config' is missing or not a mapping")
    _refuse_non_finite(path, state)
    return state


def _refuse_non_finite(path: Path, state: dict[str, Any]) -> None:
    """Refuse NaN/Inf weights (the model's, and the best weights a last.ckpt keeps), naming the first
    bad tensor: every reader (predict, training.init_from, resuming) loads through :func:`load`."""
    for part in ("model", "best_model"):
        weights = state.get(part)
        if not isinstance(weights, dict):  # best_model: None before the first validation
            continue
        for name, tensor in weights.items():
            if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()) \
                    and not bool(torch.isfinite(tensor).all()):
                where = name if part == "model" else f"{name} (of {part!r})"
                raise PipelineError(f"{path}: damaged checkpoint: weight {where} holds NaN/Inf values")


def load_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                 *, assign: bool = False) -> None:
    """``module.load_state_dict(state_dict)`` (strict), refusing weights of other names or shapes
    with one line naming ``path``. ``assign=True`` checks a skeleton built on the meta device."""
    try:
        module.load_state_dict(state_dict, assign=assign)
    except RuntimeError as exc:  # "Error(s) in loading state_dict for PTMMamba:\n\tsize mismatch for ..."
        detail = str(exc).split(":", 1)[-1] if str(exc).startswith("Error(s) in loading") else str(exc)
        raise PipelineError(f"{path}: weights do not fit the model: {one_line(detail)}") from None
