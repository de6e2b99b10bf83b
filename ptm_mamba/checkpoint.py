"""Checkpoints: tensors and plain Python values only, written atomically.

``best.ckpt`` holds the model (weights, its config, the run config);
``last.ckpt`` and the resume state add the optimiser, the scheduler, the
position in training (epoch, batch, step) and the metrics so far. Every file
loads with ``torch.load(weights_only=True)``. :func:`load_model` makes a trained model of one.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .config import validate
from .errors import PipelineError, one_line
from .fileio import atomic_path
from .model import ModelConfig, PTMMamba
from .settings import EsmSettings, Settings

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


class TrainedModel(NamedTuple):
    model: PTMMamba  # in eval mode
    settings: Settings | None  # the training run's settings; None where its recorded config does not validate
    stage_settings: dict | None  # the run's recorded train-stage settings, key -> value or file identity (stages.py)
    esm: EsmSettings | None  # the ESM-2 the model was trained with: settings.esm, or the recorded esm section

    @property
    def trained_esm(self) -> str | None:
        """The identity of the ESM-2 weights the model was trained with, as its run recorded it."""
        return self.stage_settings.get("esm.model") if isinstance(self.stage_settings, dict) else None


def recorded_settings(recorded: Any) -> Settings | None:
    """The settings of a checkpoint's recorded config, with the defaults of keys added since filled
    in (on a copy); None where it does not validate (a checkpoint of the original pipeline records
    its ESM-2 alone, see :mod:`ptm_mamba.original`)."""
    try:
        return Settings.from_config(validate(copy.deepcopy(recorded), source="the checkpoint's config"))
    except (PipelineError, TypeError, ValueError, KeyError, AttributeError):
        return None


def _recorded_esm(recorded: Any, settings: Settings | None) -> EsmSettings | None:
    if settings is not None:
        return settings.esm
    try:  # a config that does not validate: its esm section, as recorded
        esm = recorded["esm"]
        return EsmSettings(model=esm["model"], repr_layer=esm["repr_layer"])
    except (AttributeError, KeyError, TypeError):
        return None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", scan: str = "auto") -> TrainedModel:
    """The trained model of a ``best.ckpt``/``last.ckpt``, with the settings of its run.

    ``scan`` picks the kernels here (see :class:`ModelConfig`), whatever the training run used. A
    checkpoint whose config or weights do not make a model raises :class:`PipelineError`.
    """
    state = load(path, map_location=device)
    try:
        config = ModelConfig.from_dict({**state["model_config"], "scan": scan})
        with torch.device("meta"):  # allocates nothing, whatever sizes the config names
            skeleton = PTMMamba(config)
    except Exception as exc:  # e.g. a crafted model_config: wrong types, impossible sizes
        raise PipelineError(f"{path}: cannot build its model: {one_line(exc)}") from None
    weights = drop_unused_mixer_params(state["model"])
    load_weights(skeleton, weights, path, assign=True)  # names and shapes first
    model = PTMMamba(config).to(device)
    load_weights(model, weights, path)
    settings = recorded_settings(state.get("config"))
    return TrainedModel(model.eval(), settings, state.get("settings"), _recorded_esm(state.get("config"), settings))


_UNUSED_MIXER = ("A_b_log", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight",
                 "dt_proj_b.bias", "D_b")


def drop_unused_mixer_params(state_dict: dict) -> dict:
    """The published checkpoint's bundled mamba-ssm fork creates *_b mixer parameters it never uses."""
    return {k: v for k, v in state_dict.items() if not k.endswith(_UNUSED_MIXER)}
