"""Which ESM-2 weights ``esm.model`` names, where they are, and how they are read.

A fair-esm pretrained name is fetched into the torch hub cache and read as a local file, since
``torch.hub.load_state_dict_from_url`` loads with ``weights_only=False``; ``.pt`` files are read
under ``weights_only=True``, allowing only ``argparse.Namespace`` besides tensors.

ESM-2 in the Hugging Face layout (a folder, or a Hub id) is read from safetensors (no pickle) into
fair-esm's ``ESM2`` under fair-esm's names, so :mod:`ptm_mamba.esm` runs on it unchanged: the
conventions (query scaling, rotary tables, GELU, pre-LayerNorm, token dropout) agree. Only ESM-2's
shape is taken; the unused MLM head is the file's, else zeros.

The weights' identity (:func:`esm_identity`) is their content hash. Nothing here imports torch or
fair-esm until weights are looked up or read: the Snakefile asks for identities at every parse.
"""

from __future__ import annotations

import functools
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ptm_mamba.errors import PipelineError, one_line
from ptm_mamba.fileio import atomic_path, atomic_write_json
from ptm_mamba.hashing import cache_dir, file_sha256, lock, sha256_of

_URL = "https://dl.fbaipublicfiles.com/fair-esm/{folder}/{file}"
_DOWNLOAD_TIMEOUT_S = 20  # per socket operation: an offline machine fails fast


@functools.lru_cache(maxsize=None)
def esm2_names() -> tuple[str, ...]:
    """fair-esm's pretrained ESM-2 names, smallest first."""
    import esm.pretrained

    return tuple(sorted((n for n in dir(esm.pretrained) if n.startswith("esm2_t")),
                        key=lambda n: int(re.match(r"esm2_t(\d+)_", n).group(1))))


def __getattr__(name: str):
    if name == "ESM2_NAMES":  # computed on first use: it imports fair-esm (and torch)
        return esm2_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



def hub_checkpoint_dir() -> Path:
    """The folder where fair-esm (through torch.hub) caches pretrained weights."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _checkpoint_files(name: str) -> tuple[str, str]:
    return f"{name}.pt", f"{name}-contact-regression.pt"


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` atomically."""
    with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, \
            open(tmp, "wb") as out:
        size = int(getattr(response, "headers", {}).get("Content-Length", 0) or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def cached_pretrained(name: str) -> Path:
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
    """The local files that hold ``esm.model``'s weights, downloading nothing (a Hub id's are not listed)."""
    model = str(model)
    if model in esm2_names():
        return [hub_checkpoint_dir() / file for file in _checkpoint_files(model)]
    path = Path(model).expanduser()
    if path.is_dir():
        return hub_model_files(path)
    if is_hub_id(model):
        return []
    return [path, path.with_name(_checkpoint_files(path.stem)[1])]


def load_fair_esm(path: Path):
    """fair-esm's ``(ESM2, Alphabet)`` of a ``.pt`` file (weights_only, see the module docstring)."""
    import argparse
    import pickle

    import esm.pretrained
    import torch

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
        what = f"it pickles {found.group(1)}" if found else one_line(e)
        raise PipelineError(f"cannot load ESM checkpoint {path} with torch.load(weights_only=True): "
                            f"{what}; only tensors, plain values and argparse.Namespace are allowed") from None
    except (RuntimeError, KeyError, AttributeError) as e:  # not fair-esm's ESM-2 layout
        raise PipelineError(f"cannot load ESM checkpoint {path}: {one_line(e, 300)}") from None



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


def is_hub_id(model: str) -> bool:
    """``owner/name`` that is not a local path."""
    return bool(_HUB_ID.fullmatch(model)) and not model.endswith(".pt") and not Path(model).expanduser().exists()


def _hub_complete(folder: Path) -> bool:
    return all(f.is_file() for f in hub_model_files(folder))


def cached_hub(repo_id: str) -> Path:
    """The Hub repository's cached folder, downloading missing HUB_FILES."""
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
        reason = one_line(e) or type(e).__name__
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
        raise PipelineError(f"ESM model {where}: config.json unreadable ({one_line(e)})") from None

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


def _read_safetensors(folder: Path, where: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = [f for f in hub_model_files(folder) if f.suffix == ".safetensors"]
    if not files:
        raise PipelineError(f"ESM model {where}: model.safetensors.index.json names no weight files")
    tensors: dict = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise PipelineError(f"ESM model {where}: cannot read {f.name} "
                                f"({one_line(e)})") from None
    return tensors


def _fair_esm_state(tensors: dict, cfg: dict, where: str) -> dict:
    """transformers' ESM-2 weights under fair-esm ESM2's state-dict names (float32)."""
    import torch

    state: dict = {}
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


def load_hub_folder(folder: Path, where: str):
    """fair-esm's ``(ESM2, Alphabet)`` holding the weights of a Hugging Face ESM-2 folder."""
    import esm as fair_esm
    import torch
    from esm.model.esm2 import ESM2

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
                            f"{one_line(detail, 300)}") from None
    eps = float(cfg.get("layer_norm_eps", 1e-12))  # transformers' default
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps
    return module, alphabet


def model_name(model: str) -> str:
    """The name a model goes by, stored with its embeddings."""
    model = str(model)
    if model in esm2_names():
        return model
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().name
    if is_hub_id(model):
        return model
    if model.endswith(".pt") or os.sep in model or path.exists():
        return path.stem
    raise PipelineError(f"unknown ESM model {model!r}: use one of {', '.join(esm2_names())}, a path to a "
                        "fair-esm .pt checkpoint, a Hugging Face Hub id (facebook/esm2_t6_8M_UR50D) or a "
                        "folder with its config.json and model.safetensors")



def hub_model_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a Hugging Face model folder that the ESM-2 loader reads."""
    folder = Path(folder).expanduser()
    files = [folder / "config.json"] + ([folder / "vocab.txt"] if (folder / "vocab.txt").is_file() else [])
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return files + [folder / "model.safetensors"]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # the loader names the problem
        shards = []
    return files + [index] + [folder / s for s in shards if isinstance(s, str) and Path(s).name == s]


def pretrained_weights(model: str) -> Path | None:
    """Where fair-esm caches a pretrained name's weights (there or not yet); None for other models."""
    model = str(model)
    if not re.fullmatch(r"esm2_t\w+", model):  # not a name: no need to import torch and fair-esm
        return None
    return weight_files(model)[0] if model in esm2_names() else None


def _first_seen_path() -> Path:
    return cache_dir() / "esm-first-seen.json"


def first_seen_sha256(name: str, path: str | os.PathLike, sha256: str) -> str | None:
    """The content hash first seen in the cached weights file ``path`` of the pretrained name ``name``;
    when none is recorded, ``sha256`` (the file's bytes now) is recorded and returned.

    The record (``esm-first-seen.json`` beside the hash cache) lets a name keep its identity once
    its weights are downloaded, while the bytes stay those first seen. None when it cannot be kept."""
    import datetime as dt

    record = _first_seen_path()
    key = f"{name} {Path(path).expanduser().resolve()}"
    held = lock(record)  # read, then write: two processes seeing no record record the same bytes
    try:
        try:
            seen = json.loads(record.read_text())
        except (FileNotFoundError, ValueError):  # none yet, or not JSON (then what is there now counts)
            seen = {}
        except OSError:
            return None
        if not isinstance(seen, dict):
            seen = {}
        entry = seen.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        try:
            atomic_write_json(record, {**seen, key: {"sha256": sha256, "first_seen": now}})
        except OSError:
            return None
        return sha256
    finally:
        if held is not None:
            held.close()


def esm_identity(model: str) -> str:
    """Which ESM-2 weights ``esm.model`` means: a local file's or folder's content hash; for a
    pretrained name the name, or ``<name>@sha256:<hex>`` once its cached bytes differ from those
    first seen (:func:`first_seen_sha256`); for a Hub id its name."""
    model = str(model)
    weights = pretrained_weights(model)
    if weights is not None:
        sha256 = file_sha256(weights)
        if sha256 is None:  # not downloaded yet: the stage that needs the weights fetches them
            return model
        return model if first_seen_sha256(model, weights, sha256) in (None, sha256) else f"{model}@{sha256}"
    folder = Path(model).expanduser()
    if folder.is_dir():
        listing = "\n".join(f"{p.name} {file_sha256(p)}" for p in hub_model_files(folder))
        return sha256_of(listing.encode())
    return file_sha256(model) or model


def esm_sha256(model: str) -> str | None:
    """The content hash of ``esm.model``'s weights as they are now; None for a Hub id or absent weights."""
    model = str(model)
    weights = pretrained_weights(model)
    if weights is not None:
        return file_sha256(weights)
    if Path(model).expanduser().is_dir():
        return esm_identity(model)
    return file_sha256(model)
