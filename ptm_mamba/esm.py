"""ESM-2 per-residue embeddings: loading fair-esm checkpoints and a fast batched forward.

Loading goes through fair-esm's own loader (``esm.pretrained.load_model_and_alphabet_local``)
with ``torch.load``'s default ``weights_only=True``; the only extra class allowed in the
unpickler is ``argparse.Namespace``, which fair-esm checkpoints use for their config.
fair-esm's hub path is not used because ``torch.hub.load_state_dict_from_url`` loads
with ``weights_only=False``: pretrained names are fetched into the torch hub cache
(``torch.hub.get_dir()/checkpoints/``, the folder fair-esm itself uses) and loaded
from there as local files.

ESM-2 in the Hugging Face layout (transformers' ``EsmModel``/``EsmForMaskedLM``: a folder
with ``config.json`` and ``model.safetensors``, or a Hub id such as
``facebook/esm2_t33_650M_UR50D``, fetched with huggingface_hub into its cache) is read
from safetensors (no pickle) and its weights are put into fair-esm's ``ESM2`` module under
fair-esm's names, so everything below runs on it unchanged. The conventions agree:
transformers scales the query by ``head_dim**-0.5`` before the rotary embedding as fair-esm
does, uses the same rotary tables (``inv_freq`` from the file, else from ``rope_theta``), the
same exact GELU and pre-LayerNorm layers with a final ``emb_layer_norm_after``, and the same
token dropout when given the attention mask (without one it counts padding in the sequence
length); the LayerNorm epsilon is the config's ``layer_norm_eps``. Only ESM-2's shape is
taken: rotary positions, no embedding LayerNorm, feed-forward width 4 x hidden, fair-esm's
33-token alphabet. The MLM head, unused here, is the file's when it has one (EsmForMaskedLM),
else zeros.

The forward (``esm_forward``) re-implements fair-esm's ``ESM2.forward`` over the same
weights, with fused q/k/v projections and ``F.scaled_dot_product_attention`` under a
key-padding mask. It reproduces fair-esm exactly, quirks included: ESM-2 checkpoints
set ``token_dropout``, and fair-esm applies it in eval too: ``<mask>`` embeddings are
zeroed and every embedding is scaled by ``(1 - 0.15 * 0.8) / (1 - mask_ratio)``, where
``mask_ratio`` is the sequence's fraction of ``<mask>`` tokens over its length with
``<cls>``/``<eos>`` (so 0.88 for a sequence without masks).

``embed`` runs length-sorted batches under a padded-token budget, splits sequences
longer than ``window`` residues into overlapping windows (averaged where they
overlap), and yields one float32 ``(L + 2, embed_dim)`` array per key: ESM-2's
output at ``<cls>``, at each residue, and at ``<eos>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Iterable, Iterator, NamedTuple

import esm as fair_esm
import esm.pretrained
import numpy as np
import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from ptm_mamba.batching import plan_batches
from ptm_mamba.errors import PipelineError
from ptm_mamba.fileio import atomic_path

ESM2_NAMES: tuple[str, ...] = tuple(
    sorted((n for n in dir(esm.pretrained) if n.startswith("esm2_t")),
           key=lambda n: int(re.match(r"esm2_t(\d+)_", n).group(1)))
)
_URL = "https://dl.fbaipublicfiles.com/fair-esm/{folder}/{file}"
_DOWNLOAD_TIMEOUT_S = 20  # per socket operation: an offline machine fails fast
# Not cuDNN attention: it builds an execution plan for every new (batch, length) shape,
# and length-sorted batches of real proteins nearly all have a new shape.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class EsmModel:
    """A frozen fair-esm ESM-2 model, its alphabet, and the layer we read embeddings from."""

    model: ESM2
    alphabet: fair_esm.Alphabet
    name: str
    num_layers: int
    embed_dim: int
    repr_layer: int
    _weights: dict = field(default_factory=dict, repr=False)  # (device, dtype) -> weights

    @classmethod
    def wrap(cls, model: ESM2, alphabet, name: str, repr_layer: int | None = None,
             device: str | torch.device = "cpu") -> "EsmModel":
        """Put ``model`` in eval mode without gradients on ``device`` and check ``repr_layer``."""
        if not isinstance(model, ESM2):
            raise PipelineError(f"ESM model {name} is {type(model).__name__}, not ESM-2")
        model = model.eval().requires_grad_(False).to(device)
        n = model.num_layers
        if repr_layer is None:
            repr_layer = n
        if isinstance(repr_layer, bool) or not isinstance(repr_layer, int) or not 0 <= repr_layer <= n:
            raise PipelineError(f"esm repr_layer {repr_layer!r} is not in 0..{n} ({name} has {n} layers)")
        return cls(model, alphabet, name, n, model.embed_dim, repr_layer)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device


# ----------------------------------------------------------------------------- loading

def hub_checkpoint_dir() -> Path:
    """The folder where fair-esm (through torch.hub) caches pretrained weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _checkpoint_files(name: str) -> tuple[str, str]:
    return f"{name}.pt", f"{name}-contact-regression.pt"


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` atomically (temp file in the same folder, then rename)."""
    with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, \
            open(tmp, "wb") as out:
        size = int(getattr(response, "headers", {}).get("Content-Length", 0) or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _cached_pretrained(name: str) -> Path:
    """Path of ``<name>.pt`` in the hub cache, downloading the missing files first."""
    folder = hub_checkpoint_dir()
    model_file, regression_file = _checkpoint_files(name)
    for file, kind in ((model_file, "models"), (regression_file, "regression")):
        if (folder / file).is_file():
            continue
        try:
            _download(_URL.format(folder=kind, file=file), folder / file)
        except (urllib.error.URLError, OSError) as e:  # offline, DNS, timeout, HTTP error
            reason = str(getattr(e, "reason", e)).replace("\n", " ")
            raise PipelineError(
                f"ESM weights {name} are not cached and could not be downloaded ({reason}): "
                f"place {model_file} and {regression_file} in {folder}, "
                f"or name the file itself (esm.model in a config, --esm-model for import-original)"
            ) from None
    return folder / model_file


def weight_files(model: str) -> list[Path]:
    """The local files that hold ``esm.model``'s weights, without downloading anything: a fair-esm
    name's files in the hub cache, a ``.pt`` path (and its contact-regression file), a Hub-layout
    folder's files. A Hub id's files live in the Hugging Face cache and are not listed."""
    from ptm_mamba.stages import hub_model_files

    model = str(model)
    if model in ESM2_NAMES:
        return [hub_checkpoint_dir() / file for file in _checkpoint_files(model)]
    path = Path(model).expanduser()
    if path.is_dir():
        return hub_model_files(path)
    if _is_hub_id(model):
        return []
    return [path, path.with_name(_checkpoint_files(path.stem)[1])]


def _load_local(path: Path) -> tuple[ESM2, fair_esm.Alphabet]:
    """fair-esm's local loader under weights_only=True, allowing only argparse.Namespace."""
    if not path.is_file():
        raise PipelineError(f"ESM checkpoint not found: {path}")
    if not path.stem.startswith("esm2"):
        raise PipelineError(f"ESM checkpoint {path}: the file name must start with 'esm2' "
                            "(fair-esm picks the ESM-2 format from the name)")
    regression = path.with_name(_checkpoint_files(path.stem)[1])
    if not regression.is_file():
        raise PipelineError(f"ESM checkpoint {path} needs {regression.name} beside it: {regression}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return esm.pretrained.load_model_and_alphabet_local(str(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it pickles {found.group(1)}" if found else " ".join(str(e).split())[:200]
        raise PipelineError(f"cannot load ESM checkpoint {path} with torch.load(weights_only=True): "
                            f"{what}; only tensors, plain values and argparse.Namespace are allowed") from None
    except (RuntimeError, KeyError, AttributeError) as e:  # not fair-esm's ESM-2 layout
        detail = " ".join(str(e).split())[:300]
        raise PipelineError(f"cannot load ESM checkpoint {path}: {detail}") from None


# ----------------------------------------------------------------------------- Hugging Face layout

HUB_FILES = ["config.json", "vocab.txt", "model.safetensors", "model.safetensors.index.json",
             "model-*-of-*.safetensors"]  # what is fetched of a Hub repository (no pickles, no TF/Flax)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# transformers' names (after an "esm." prefix, with LayerNorm gamma/beta as weight/bias) -> fair-esm's
_HF_NAMES = [(re.compile(a), b) for a, b in (
    (r"embeddings\.word_embeddings\.weight", "embed_tokens.weight"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"layers.\1.self_attn.q_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"layers.\1.self_attn.k_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"layers.\1.self_attn.v_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.self_attn.out_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.LayerNorm\.(weight|bias)", r"layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.LayerNorm\.(weight|bias)", r"layers.\1.final_layer_norm.\2"),
    (r"encoder\.emb_layer_norm_after\.(weight|bias)", r"emb_layer_norm_after.\1"),
    (r"contact_head\.regression\.(weight|bias)", r"contact_head.regression.\1"),
    (r"lm_head\.(dense|layer_norm)\.(weight|bias)", r"lm_head.\1.\2"),
    (r"lm_head\.bias", "lm_head.bias"),
)]
# Not part of the encoder: the pooler, cached position ids, the LM decoder (tied to the embedding).
_HF_UNUSED = re.compile(r"pooler\..*|embeddings\.position_ids|lm_head\.decoder\.weight")
_HF_INV_FREQ = "rotary_embeddings.inv_freq"  # model-level, or per layer (.attention.self.) in older files


def _is_hub_id(model: str) -> bool:
    """``owner/name`` that is not a local path."""
    return bool(_HUB_ID.fullmatch(model)) and not model.endswith(".pt") and not Path(model).expanduser().exists()


def _hub_complete(folder: Path) -> bool:
    from ptm_mamba.stages import hub_model_files

    return all(f.is_file() for f in hub_model_files(folder))


def _cached_hub(repo_id: str) -> Path:
    """The Hub repository's folder in the Hugging Face cache, downloading what is missing
    (only the files in HUB_FILES)."""
    import huggingface_hub
    from huggingface_hub import constants

    try:  # what is cached is used as it is: no network needed, nothing changes under a run
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        if _hub_complete(folder):
            return folder
    except Exception:  # noqa: BLE001 - not cached (huggingface_hub's LocalEntryNotFoundError and kin)
        pass
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown repository, HTTP error: all one line
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise PipelineError(
            f"ESM model {repo_id} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and could not be "
            f"downloaded ({reason}): fetch it where there is network (hf download {repo_id} --include "
            f"config.json vocab.txt 'model*.safetensors*') and copy that cache here (or set HF_HOME), "
            f"or set esm.model: /path/to/a/folder with config.json and model.safetensors"
        ) from None
    if not _hub_complete(folder):
        raise PipelineError(f"ESM model {repo_id}: the Hub repository has no config.json and model.safetensors "
                            f"(found {sorted(p.name for p in folder.iterdir())}); only safetensors weights are read")
    return folder


def _hub_config(folder: Path, where: str, alphabet) -> dict:
    """config.json of an ESM-2 in the Hugging Face layout, checked against what ESM2 can hold."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise PipelineError(f"ESM model {where}: config.json unreadable ({' '.join(str(e).split())[:200]})") from None

    def refuse(why: str):
        raise PipelineError(f"ESM model {where}: not an ESM-2 model: {why}")

    ints = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    for key in ints:
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] < 1:
            refuse(f"config.json {key} is {cfg.get(key)!r}")
    if cfg.get("model_type") != "esm" or cfg.get("is_folding_model"):
        refuse(f"config.json model_type {cfg.get('model_type')!r}")
    if cfg.get("position_embedding_type") != "rotary":
        refuse(f"position_embedding_type {cfg.get('position_embedding_type')!r} (ESM-2 uses rotary; "
               "ESM-1b/1v checkpoints are not read)")
    if cfg.get("emb_layer_norm_before") or cfg.get("is_decoder") or cfg.get("hidden_act", "gelu") != "gelu":
        refuse("emb_layer_norm_before, is_decoder or a hidden_act other than gelu")
    if cfg["intermediate_size"] != 4 * cfg["hidden_size"] or cfg["hidden_size"] % cfg["num_attention_heads"]:
        refuse(f"intermediate_size {cfg['intermediate_size']} / hidden_size {cfg['hidden_size']} / "
               f"num_attention_heads {cfg['num_attention_heads']} is not ESM-2's shape")
    tokens = {"vocab_size": len(alphabet), "pad_token_id": alphabet.padding_idx, "mask_token_id": alphabet.mask_idx}
    for key, value in tokens.items():
        if cfg.get(key) != value:
            refuse(f"config.json {key} is {cfg.get(key)!r}, fair-esm's alphabet has {value}")
    vocab = folder / "vocab.txt"
    if vocab.is_file() and vocab.read_text().split() != list(alphabet.all_toks):
        refuse("vocab.txt is not fair-esm's ESM-2 alphabet")
    return cfg


def _read_safetensors(folder: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ptm_mamba.stages import hub_model_files

    files = [f for f in hub_model_files(folder) if f.suffix == ".safetensors"]
    if not files:
        raise PipelineError(f"ESM model {where}: model.safetensors.index.json names no weight files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise PipelineError(f"ESM model {where}: cannot read {f.name} "
                                f"({' '.join(str(e).split())[:200]})") from None
    return tensors


def _fair_esm_state(tensors: dict[str, torch.Tensor], cfg: dict, where: str) -> dict[str, torch.Tensor]:
    """transformers' ESM-2 weights under fair-esm ESM2's state-dict names (float32)."""
    state: dict[str, torch.Tensor] = {}
    inv_freq = None
    for key in sorted(tensors):
        name = key.removeprefix("esm.")
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
        if name.endswith(_HF_INV_FREQ):
            inv_freq = tensors[key] if inv_freq is None else inv_freq  # the first, as transformers takes it
            continue
        if _HF_UNUSED.fullmatch(name):
            continue
        target = next((rx.sub(repl, name) for rx, repl in _HF_NAMES if rx.fullmatch(name)), None)
        if target is None:
            raise PipelineError(f"ESM model {where}: unexpected tensor {key!r} (not an ESM-2 encoder)")
        state[target] = tensors[key].float()
    if inv_freq is None:  # what transformers and fair-esm compute
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        inv_freq = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, head_dim, 2, dtype=torch.float)
                                                               / head_dim))
    for i in range(cfg["num_hidden_layers"]):
        state[f"layers.{i}.self_attn.rot_emb.inv_freq"] = inv_freq.float()
    embed = state.get("embed_tokens.weight")
    if embed is not None:  # fair-esm's LM head is tied to the embedding; an EsmModel file has no head
        d, v = embed.shape[1], embed.shape[0]
        state["lm_head.weight"] = embed
        for key, value in (("lm_head.dense.weight", torch.zeros(d, d)), ("lm_head.dense.bias", torch.zeros(d)),
                           ("lm_head.layer_norm.weight", torch.ones(d)), ("lm_head.layer_norm.bias", torch.zeros(d)),
                           ("lm_head.bias", torch.zeros(v))):
            state.setdefault(key, value)
    return state


def _load_hub_dir(folder: Path, where: str) -> tuple[ESM2, fair_esm.Alphabet]:
    """fair-esm's ESM2 holding the weights of a Hugging Face ESM-2 folder."""
    if not (folder / "config.json").is_file():
        raise PipelineError(f"ESM model {where}: no config.json in {folder} (a Hugging Face model folder holds "
                            "config.json and model.safetensors)")
    alphabet = fair_esm.Alphabet.from_architecture("ESM-1b")
    cfg = _hub_config(folder, where, alphabet)
    state = _fair_esm_state(_read_safetensors(folder, where), cfg, where)
    with torch.device("meta"):  # allocates nothing: the file's tensors are assigned below
        module = ESM2(num_layers=cfg["num_hidden_layers"], embed_dim=cfg["hidden_size"],
                      attention_heads=cfg["num_attention_heads"], alphabet=alphabet,
                      token_dropout=bool(cfg.get("token_dropout", False)))
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = str(e).split(":", 1)[-1]
        raise PipelineError(f"ESM model {where}: weights do not fit its config.json: "
                            f"{' '.join(detail.split())[:300]}") from None
    eps = float(cfg.get("layer_norm_eps", 1e-12))  # transformers' default
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps
    return module, alphabet


def model_name(model: str) -> str:
    """The name a model goes by (stored with its embeddings): the pretrained name, the Hub id,
    the local Hugging Face folder's name, or the .pt file's stem."""
    model = str(model)
    if model in ESM2_NAMES:
        return model
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().name
    if _is_hub_id(model):
        return model
    if model.endswith(".pt") or os.sep in model or path.exists():
        return path.stem
    raise PipelineError(f"unknown ESM model {model!r}: use one of {', '.join(ESM2_NAMES)}, a path to a "
                        "fair-esm .pt checkpoint, a Hugging Face Hub id (facebook/esm2_t6_8M_UR50D) or a "
                        "folder with its config.json and model.safetensors")


def load_esm(model: str, repr_layer: int | None = None, device: str | torch.device = "cpu") -> EsmModel:
    """Load ESM-2 by fair-esm pretrained name (e.g. esm2_t33_650M_UR50D), fair-esm ``.pt`` path,
    Hugging Face Hub id (e.g. facebook/esm2_t33_650M_UR50D) or local Hugging Face model folder."""
    name = model_name(model)
    path = Path(str(model)).expanduser()
    if str(model) in ESM2_NAMES:
        module, alphabet = _load_local(_cached_pretrained(name))
    elif path.is_dir():
        module, alphabet = _load_hub_dir(path, str(path))
    elif _is_hub_id(str(model)):
        module, alphabet = _load_hub_dir(_cached_hub(name), name)
    else:
        module, alphabet = _load_local(path)
    return EsmModel.wrap(module, alphabet, name, repr_layer, device)


# ----------------------------------------------------------------------------- tokens and batches

def esm_token_ids(alphabet, residues: str, mask: np.ndarray | None = None, key: Hashable = None) -> np.ndarray:
    """Token ids (L,) uint8 of ``residues`` without <cls>/<eos>; positions where ``mask`` is True get <mask>."""
    lut = np.full(256, 255, dtype=np.uint8)
    for tok, idx in alphabet.tok_to_idx.items():
        if len(tok) == 1:
            lut[ord(tok)] = idx
    try:
        ids = lut[np.frombuffer(residues.encode("ascii"), dtype=np.uint8)]
    except UnicodeEncodeError:
        ids = np.full(len(residues), 255, dtype=np.uint8)
    if (bad := np.flatnonzero(ids == 255)).size:
        i = int(bad[0])
        raise PipelineError(f"sequence {key}: residue {residues[i]!r} at position {i + 1} "
                            "is not in the ESM alphabet")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ids.shape:
            raise PipelineError(f"sequence {key}: mask has shape {mask.shape}, expected ({len(ids)},)")
        ids[mask] = alphabet.mask_idx
    return ids


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Starts of the fewest ``window``-long windows covering ``length`` residues with at least
    ``overlap`` residues shared by neighbours, spread evenly; ``[0]`` when it fits in one."""
    if length <= window:
        return [0]
    n = math.ceil((length - overlap) / (window - overlap))
    return [i * (length - window) // (n - 1) for i in range(n)]


# ----------------------------------------------------------------------------- forward

class _Layer(NamedTuple):
    ln1: tuple[torch.Tensor, torch.Tensor, float]
    qkv_w: torch.Tensor  # (3D, D), q rows pre-multiplied by fair-esm's head_dim**-0.5
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor, float]
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


class _Weights(NamedTuple):
    embed: torch.Tensor  # (V, D) fp32
    inv_freq: torch.Tensor  # (head_dim / 2,) rotary frequencies
    layers: list[_Layer]
    final_ln: tuple[torch.Tensor, torch.Tensor, float]


def _ln(norm: torch.nn.Module, device) -> tuple[torch.Tensor, torch.Tensor, float]:
    return norm.weight.to(device), norm.bias.to(device), norm.eps


@torch.no_grad()
def _weights(esm_model: EsmModel, device: torch.device, dtype: torch.dtype) -> _Weights:
    """The model's weights on ``device``: matmul weights in ``dtype``, the rest in fp32.
    Cached on the EsmModel (one device/dtype at a time)."""
    key = (str(device), dtype)
    if key not in esm_model._weights:
        esm_model._weights.clear()
        m = esm_model.model
        cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        layers = []
        for layer in m.layers:
            att = layer.self_attn
            qkv_w = torch.cat([att.q_proj.weight * att.scaling, att.k_proj.weight, att.v_proj.weight])
            qkv_b = torch.cat([att.q_proj.bias * att.scaling, att.k_proj.bias, att.v_proj.bias])
            layers.append(_Layer(
                _ln(layer.self_attn_layer_norm, device), cast(qkv_w), cast(qkv_b),
                cast(att.out_proj.weight), cast(att.out_proj.bias), _ln(layer.final_layer_norm, device),
                cast(layer.fc1.weight), cast(layer.fc1.bias), cast(layer.fc2.weight), cast(layer.fc2.bias),
            ))
        esm_model._weights[key] = _Weights(
            m.embed_tokens.weight.to(device), m.layers[0].self_attn.rot_emb.inv_freq.to(device),
            layers, _ln(m.emb_layer_norm_after, device))
    return esm_model._weights[key]


def _rotary_tables(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, head_dim) exactly as fair-esm's RotaryEmbedding builds them."""
    t = torch.arange(length, device=inv_freq.device).type_as(inv_freq)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _compute_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def esm_forward(esm_model: EsmModel, tokens: torch.Tensor, layer: int | None = None,
                device: str | torch.device | None = None) -> torch.Tensor:
    """Hidden states (B, T, D) after ``layer`` (default: repr_layer) for tokens (B, T) with
    <cls>/<eos>/<pad>, equal to fair-esm's ``model(tokens, repr_layers=[layer])["representations"][layer]``.

    Runs on ``device`` (default: the tokens') under inference_mode; on CUDA under autocast
    (bf16, else fp16) with the residual stream and layer norms in fp32, on CPU in fp32.
    Returns fp32 on ``device``. Give CPU tokens to avoid a device sync (padding is checked there).
    """
    layer = esm_model.repr_layer if layer is None else layer
    m = esm_model.model
    device = tokens.device if device is None else torch.device(device)
    dtype = _compute_dtype(device)
    w = _weights(esm_model, device, dtype)
    padded = bool(tokens.eq(m.padding_idx).any())  # no padding: SDPA may pick flash attention
    if tokens.device != device:
        tokens = (tokens.pin_memory() if device.type == "cuda" else tokens).to(device, non_blocking=True)
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), autocast, sdpa_kernel(_SDPA_BACKENDS):
        pad = tokens.eq(m.padding_idx)  # (B, T)
        x = m.embed_scale * F.embedding(tokens, w.embed)  # (B, T, D) fp32
        if m.token_dropout:  # applied by fair-esm in eval too
            is_mask = tokens.eq(m.mask_idx)
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            mask_ratio = is_mask.sum(-1).to(x.dtype) / (~pad).sum(-1)
            x = x * (1 - 0.15 * 0.8) / (1 - mask_ratio)[:, None, None]
        x = x * (~pad).unsqueeze(-1).type_as(x)
        B, T, D = x.shape
        H = m.attention_heads
        keep = (~pad)[:, None, None, :] if padded else None  # (B, 1, 1, T): True = attend
        if layer > 0:
            cos, sin = _rotary_tables(w.inv_freq, T)
            cos, sin = cos.to(dtype), sin.to(dtype)
        for lw in w.layers[:layer]:
            h = F.layer_norm(x, (D,), *lw.ln1[:2], eps=lw.ln1[2])
            q, k, v = F.linear(h, lw.qkv_w, lw.qkv_b).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v,
                                               attn_mask=keep, scale=1.0)  # q is pre-scaled
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, D), lw.out_w, lw.out_b)
            h = F.layer_norm(x, (D,), *lw.ln2[:2], eps=lw.ln2[2])
            x = x + F.linear(F.gelu(F.linear(h, lw.fc1_w, lw.fc1_b)), lw.fc2_w, lw.fc2_b)
        if layer == esm_model.num_layers:  # fair-esm normalises the last layer's representation
            x = F.layer_norm(x, (D,), *w.final_ln[:2], eps=w.final_ln[2])
        return x.float()


# ----------------------------------------------------------------------------- embedding

class _Piece(NamedTuple):
    item: int  # index into the item list
    start: int  # first residue of this window
    length: int  # residues in this window


def _add_window(total: np.ndarray, count: np.ndarray, rows: np.ndarray, p: _Piece) -> None:
    """Add one window's rows (<cls>, its residues, <eos>) into a sequence's sums (L + 2 rows):
    residues where they are, <cls> only from the first window, <eos> only from the last."""
    residues = len(total) - 2
    span = slice(1 + p.start, 1 + p.start + p.length)
    total[span] += rows[1:-1]
    count[span] += 1
    if p.start == 0:
        total[0], count[0] = rows[0], 1
    if p.start + p.length == residues:
        total[-1], count[-1] = rows[-1], 1


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PipelineError(f"esm {name} must be a positive integer, got {value!r}")


def embed(
    esm_model: EsmModel,
    items: Iterable[tuple[Hashable, str, np.ndarray | None]],
    *,
    max_tokens_per_batch: int = 4096,
    batch_size: int | None = None,
    window: int = 1022,
    overlap: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Iterator[tuple[Hashable, np.ndarray]]:
    """Yield ``(key, float32 (L + 2, embed_dim))`` per item ``(key, residues, mask)``: ESM-2's
    output at <cls> (row 0), at residue i (row i + 1) and at <eos> (row L + 1) of the input
    ``<cls> residues <eos>`` with <mask> where ``mask`` is True. An empty sequence gives the
    2 rows of ``<cls><eos>``.

    Batches are length-sorted (longest first) with ``batch * max_len <= max_tokens_per_batch``
    padded tokens, <cls>/<eos> included. Sequences longer than ``window`` are embedded as
    overlapping windows (each its own ESM input with its own <cls>/<eos>) and their residue
    rows averaged where windows overlap; <cls> is the first window's, <eos> the last's.
    Keys come out in the order their batches finish, each exactly once. On CUDA the next
    batch is computed while the current one is being yielded.
    """
    for name, value in (("max_tokens_per_batch", max_tokens_per_batch), ("window", window)):
        _check_positive(name, value)
    _check_positive("batch_size", batch_size, allow_none=True)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < window:
        raise PipelineError(f"esm overlap must be an integer in 0..{window - 1} (window {window}), got {overlap!r}")
    device = torch.device(device) if device is not None else esm_model.device
    alphabet = esm_model.alphabet

    keys: list[Hashable] = []
    ids: list[np.ndarray] = []
    seen: set = set()
    for key, residues, mask in items:
        if key in seen:
            raise PipelineError(f"duplicate sequence key {key!r}")
        seen.add(key)
        keys.append(key)
        ids.append(esm_token_ids(alphabet, residues, mask, key))
    del seen

    pieces = [_Piece(i, s, min(window, len(t))) for i, t in enumerate(ids)
              for s in window_starts(len(t), window, overlap)]
    batches = plan_batches([p.length + 2 for p in pieces], max_tokens_per_batch, batch_size)
    n_windows = np.bincount(np.array([p.item for p in pieces], dtype=np.int64), minlength=len(ids))
    partial: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # item -> (row sums, counts, windows left)

    def launch(batch: list[int]):
        """Start the forward of one batch; returns what ``collect`` needs."""
        bp = [pieces[j] for j in batch]
        width = max(p.length for p in bp)
        toks = np.full((len(bp), width + 2), alphabet.padding_idx, dtype=np.int64)
        for r, p in enumerate(bp):
            toks[r, 0] = alphabet.cls_idx
            toks[r, 1:p.length + 1] = ids[p.item][p.start:p.start + p.length]
            toks[r, p.length + 1] = alphabet.eos_idx
        out = esm_forward(esm_model, torch.from_numpy(toks), device=device)  # (B, width + 2, D)
        if device.type == "cuda":
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return bp, host, done
        return bp, out.cpu(), None

    def collect(bp, host, done) -> Iterator[tuple[Hashable, np.ndarray]]:
        if done is not None:
            done.synchronize()
        out = host.numpy()
        for r, p in enumerate(bp):
            rows = out[r, :p.length + 2]  # <cls>, the window's residues, <eos>
            if n_windows[p.item] == 1:
                yield keys[p.item], rows.copy()
                continue
            total, count, left = partial.get(p.item) or (
                np.zeros((len(ids[p.item]) + 2, out.shape[-1]), np.float32),
                np.zeros(len(ids[p.item]) + 2, np.float32), n_windows[p.item])
            _add_window(total, count, rows, p)
            if left == 1:
                partial.pop(p.item, None)
                yield keys[p.item], total / count[:, None]
            else:
                partial[p.item] = (total, count, left - 1)

    bar = tqdm(total=sum(p.length for p in pieces), unit="res", unit_scale=True,
               desc=f"ESM {esm_model.name}", disable=not progress)
    try:
        pending = None  # one batch in flight while the previous one is yielded
        for batch in [*batches, None]:
            started = launch(batch) if batch is not None else None
            if pending is not None:
                yield from collect(*pending)
                bar.update(sum(p.length for p in pending[0]))
            pending = started
    finally:
        bar.close()
