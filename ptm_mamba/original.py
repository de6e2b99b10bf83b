"""Import a checkpoint written by the original PTM-Mamba code (programmablebio/ptm-mamba).

The original's ``train.py`` saves ``{"model": state_dict, "config": config_dict.model}``,
where ``config_dict.model`` is an OmegaConf ``DictConfig`` (hydra's), and its bundled
mamba-ssm fork gives every mixer seven parameters it never uses when ``bimamba_type`` is
"v1", its default (``A_b_log``, ``conv1d_b.*``, ``x_proj_b.weight``, ``dt_proj_b.*``,
``D_b``). :func:`import_original` reads such a file with ``torch.load(weights_only=True)``,
allowing only OmegaConf's container and node classes (and the plain types and ``typing.Any``
their pickles name), so no other code in the file can run; maps the original's model config
onto :class:`~ptm_mamba.model.ModelConfig`; drops exactly those unused tensors; and writes
a checkpoint in our format (``format_version`` 1), atomically.

``config_dict.model`` is a child of hydra's config, and its pickle carries that root: the
other keys, their ``${...}`` interpolations (``${now:...}`` too, whose resolver only hydra
registers), and the root's resolver cache, a ``collections.defaultdict(dict)`` that hydra
filled when it resolved the run directory ``outputs/${now:...}``. Only the model's keys are
resolved, each on its own (elsewhere only what a model key points to).

Config mapping (``lm.py``'s ``MambaLMHeadModel`` reads these keys and no others):

    model_type        bidirectional_mamba (the original's unidirectional "mamba" network has
                      no gate and feeds ESM features instead of tokens: it is not ours, refused)
    d_model, n_layer  as they are
    vocab_size        must be the tokenizer's 59 (null counts as 59: train.py sets it so)
    esm_embed_dim     esm_dim
    ssm_cfg           the mixer's shape keys (d_state, d_conv, expand, dt_rank, conv_bias, bias);
                      init-only keys are dropped; bimamba_type must be "v1" (with "v2" the
                      *_b parameters are used, and our mixer has no such path)
    rms_norm          must be true (LayerNorm blocks are not ours)
    residual_in_fp32, fused_add_norm, pad_vocab_size_multiple
                      ignored: they change kernels or were unused, not the function
                      (norm epsilon: the original's fixed 1e-5, ours by default)

The original fed ESM-2 (``esm2_t33_650M_UR50D``, layer 33) to the model; the imported
checkpoint names that ESM-2 (or ``--esm-model``) so that ``ptm-mamba predict`` and
``ptm_mamba.predict.predict`` compute the features themselves.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .errors import PipelineError, one_line
from .model import ModelConfig, PTMMamba
from .tokenizer import VOCAB

ORIGINAL_ESM = "esm2_t33_650M_UR50D"  # hard-coded in the original's train.py (repr_layers=[33], its last)
# ssm_cfg keys that shape the mixer's parameters (kept), and those that only initialise them (dropped).
_SSM_SHAPE_KEYS = ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias")
_SSM_INIT_KEYS = ("dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path")


def _resolver_cache(default_factory: Any) -> dict:
    """What ``collections.defaultdict(dict)``, an OmegaConf resolver cache, unpickles to here: a
    plain dict, as torch's weights-only unpickler fills no other mapping (the cached values follow
    in the pickle); :func:`_plain_config` makes the root's cache a defaultdict again."""
    if default_factory is not dict:
        raise pickle.UnpicklingError(f"collections.defaultdict({default_factory!r}) is not an OmegaConf resolver "
                                     "cache")
    return {}


def _safe_globals() -> list:
    """What an OmegaConf DictConfig's pickle names: its classes, and the plain types and
    ``typing.Any`` its metadata records (key/element/object types, the resolver cache)."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, BooleanNode, FloatNode, IntegerNode,
            StringNode, typing.Any, (_resolver_cache, "collections.defaultdict"), dict, list, str, int, float, bool]


def _refusal(exc: pickle.UnpicklingError) -> str:
    """The cause of torch's weights-only refusal, without its advice: the global refused (as
    module.name: torch writes a builtin's bare name), else the unpickler's own message."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"
        return f"refused global {name}"
    lines = [line for line in text.split("Check the documentation of torch.load")[0].splitlines() if line.strip()]
    return one_line(lines[-1].split("WeightsUnpickler error:")[-1] if lines else text)


def read_original(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and the model config (as plain values) of an original checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PipelineError(f"{path}: torch.load(weights_only=True): {_refusal(exc)}; only tensors, plain values "
                            "and OmegaConf containers are allowed") from None
    except Exception as exc:  # truncated, not a torch file
        raise PipelineError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                            f"{one_line(exc)})") from None
    if isinstance(state, dict) and "format_version" in state:
        raise PipelineError(f"{path}: already a ptm-mamba checkpoint; use it as it is")
    if not (isinstance(state, dict) and "model" in state and "config" in state):
        found = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise PipelineError(f"{path}: not in the original's layout {{'model': state_dict, 'config': model config}} "
                            f"(found {found})")
    weights = state["model"]
    if not (isinstance(weights, Mapping)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())):
        raise PipelineError(f"{path}: 'model' is not a mapping of names to tensors")
    return dict(weights), _plain_config(state["config"], path)


def _plain_config(config: Any, path: Path) -> dict[str, Any]:
    """The model config as plain values, each key resolved on its own: one whose interpolation does
    not resolve (a resolver only hydra registers, a key that is not there) stays as written, and
    matters only if the model reads it. Nothing outside the model node is evaluated unless a model
    key points there."""
    from omegaconf import Container, DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(config, DictConfig):
        root = config._get_root()
        OmegaConf.set_cache(root, collections.defaultdict(dict, OmegaConf.get_cache(root)))  # see _resolver_cache
        node, config = config, OmegaConf.to_container(config, resolve=False)
        for key in config:
            try:
                value = node[key]
                config[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
            except OmegaConfBaseException:
                pass
    if not isinstance(config, Mapping):
        raise PipelineError(f"{path}: 'config' is {type(config).__name__}, not the model's config mapping")
    return dict(config)


def model_config_of(original: dict[str, Any], where: str) -> ModelConfig:
    """Our ModelConfig for the original's model config (see the module docstring)."""
    def need(key: str, types: type | tuple) -> Any:
        value = original.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            raise PipelineError(f"{where}: config {key} is {value!r}, not a {getattr(types, '__name__', types)}")
        return value

    model_type = original.get("model_type")
    if model_type != "bidirectional_mamba":
        raise PipelineError(f"{where}: config model_type {model_type!r}: only the original's bidirectional_mamba "
                            "can be imported (its unidirectional 'mamba' network has no gate and replaces the "
                            "token embedding by the ESM features)")
    if original.get("rms_norm") is not True:
        raise PipelineError(f"{where}: config rms_norm {original.get('rms_norm')!r}: only RMSNorm blocks "
                            "(rms_norm: true, the original's setting) can be imported")
    vocab_size = original.get("vocab_size")
    if vocab_size is not None and vocab_size != len(VOCAB):
        raise PipelineError(f"{where}: config vocab_size {vocab_size!r}, but the PTM vocabulary has {len(VOCAB)} "
                            "tokens")
    ssm = original.get("ssm_cfg") or {}
    if not isinstance(ssm, Mapping):
        raise PipelineError(f"{where}: config ssm_cfg is {ssm!r}, not a mapping")
    if ssm.get("bimamba_type", "v1") != "v1":
        raise PipelineError(f"{where}: config ssm_cfg.bimamba_type {ssm['bimamba_type']!r}: its mixers use the "
                            "*_b parameters, which ours do not have; only 'v1' (the default) can be imported")
    unknown = sorted(set(ssm) - set(_SSM_SHAPE_KEYS) - set(_SSM_INIT_KEYS) - {"bimamba_type"})
    if unknown:
        raise PipelineError(f"{where}: config ssm_cfg.{unknown[0]} is not a Mamba setting")
    return ModelConfig(model_type=model_type, d_model=need("d_model", int), n_layer=need("n_layer", int),
                       esm_dim=need("esm_embed_dim", int), use_esm=True,
                       ssm_cfg={k: ssm[k] for k in _SSM_SHAPE_KEYS if k in ssm})


def import_original(source: str | os.PathLike, output: str | os.PathLike, *, esm_model: str = ORIGINAL_ESM,
                    esm_repr_layer: int | None = None) -> dict[str, Any]:
    """Convert the original's checkpoint ``source`` into our format at ``output`` (atomic).

    ``esm_model``/``esm_repr_layer`` name the ESM-2 the model is run with (stored as the
    checkpoint's ``esm`` config; default: the original's). Returns a summary: the model
    config, the tensors kept and the unused ones dropped.
    """
    from .esm_weights import ESM2_NAMES, esm_identity, model_name
    from .predict import _check_output
    from .hashing import file_sha256

    source, output = Path(source), Path(output)
    _check_output(output, checkpoint=source)
    model_name(esm_model)  # a name or path load_esm takes, else a one-line error now rather than at predict
    local = Path(str(esm_model)).expanduser()
    if str(esm_model) not in ESM2_NAMES and local.exists():
        esm_model = str(local.resolve())  # the same file wherever predict runs from
    esm_model = str(esm_model)
    weights, original = read_original(source)
    config = model_config_of(original, str(source))
    kept = checkpoint.drop_unused_mixer_params(weights)
    dropped = sorted(set(weights) - set(kept))
    stray = [k for k in dropped if ".mixer." not in k]
    if stray:
        raise PipelineError(f"{source}: unexpected tensor {stray[0]!r}")
    tied = ("backbone.embedding.weight", "lm_head.weight")
    if all(k in kept for k in tied) and not torch.equal(kept[tied[0]], kept[tied[1]]):
        raise PipelineError(f"{source}: lm_head.weight differs from backbone.embedding.weight, but the original "
                            "ties them (one tensor)")
    try:
        with torch.device("meta"):  # names and shapes, without allocating
            skeleton = PTMMamba(config)
    except Exception as exc:  # noqa: BLE001 - sizes the mixer cannot take
        raise PipelineError(f"{source}: cannot build its model: {one_line(exc)}") from None
    checkpoint.load_weights(skeleton, kept, source, assign=True)
    state = {
        "format_version": checkpoint.FORMAT_VERSION,
        "model": {k: v.detach().contiguous() for k, v in kept.items()},
        "model_config": config.to_dict(),
        "config": {"esm": {"model": esm_model, "repr_layer": esm_repr_layer}},
        "settings": {"esm.model": esm_identity(esm_model)},
        "vocab": list(VOCAB),
        "imported_from": {"path": str(source.resolve()), "sha256": file_sha256(source),
                          "original_config": original, "dropped": dropped},
    }
    checkpoint.save(state, output)
    return {"model_config": config.to_dict(), "kept": len(kept), "dropped": dropped}
