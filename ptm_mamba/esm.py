"""ESM-2 per-residue embeddings: the model, its token ids, a fast batched forward, windowed embedding.

Which weights ``esm.model`` names and how they are read (fair-esm files, the Hugging Face layout)
is :mod:`ptm_mamba.esm_weights`; :func:`load_esm` puts them into an :class:`EsmModel`.

``esm_forward`` re-implements fair-esm's ``ESM2.forward`` (fused q/k/v, SDPA) and reproduces it
exactly, quirks included: fair-esm applies ``token_dropout`` in eval too, zeroing ``<mask>``
embeddings and scaling every embedding by ``(1 - 0.15 * 0.8) / (1 - mask_ratio)`` (0.88 without masks).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Hashable, Iterable, Iterator, NamedTuple

import esm as fair_esm
import numpy as np
import torch
import torch.nn.functional as F
from esm.model.esm2 import ESM2
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from ptm_mamba.batching import plan_batches
from ptm_mamba.errors import PipelineError
from ptm_mamba.esm_weights import (ESM2_NAMES, cached_hub, cached_pretrained, is_hub_id, load_fair_esm,
                                   load_hub_folder, model_name)
from ptm_mamba.tokenizer import residue_rows, rows_of

if TYPE_CHECKING:
    from ptm_mamba.settings import Settings

__all__ = ["EsmModel", "embed", "esm_forward", "esm_token_ids", "load_esm", "load_esm_of", "window_starts"]

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


def load_esm(model: str, repr_layer: int | None = None, device: str | torch.device = "cpu") -> EsmModel:
    """Load ESM-2 by fair-esm pretrained name (e.g. esm2_t33_650M_UR50D), fair-esm ``.pt`` path,
    Hugging Face Hub id (e.g. facebook/esm2_t33_650M_UR50D) or local Hugging Face model folder."""
    name = model_name(model)
    path = Path(str(model)).expanduser()
    if str(model) in ESM2_NAMES:
        module, alphabet = load_fair_esm(cached_pretrained(name))
    elif path.is_dir():
        module, alphabet = load_hub_folder(path, str(path))
    elif is_hub_id(str(model)):
        module, alphabet = load_hub_folder(cached_hub(name), name)
    else:
        module, alphabet = load_fair_esm(path)
    return EsmModel.wrap(module, alphabet, name, repr_layer, device)


def load_esm_of(settings: Settings, device: str | torch.device | None = None) -> EsmModel:
    """The ESM-2 of ``settings.esm`` on ``device`` (default: chosen from ``settings.device``)."""
    from ptm_mamba.device import choose_device, describe, summary

    embedding = settings.embedding
    if embedding.overlap >= embedding.window:
        raise PipelineError(f"embedding.overlap ({embedding.overlap}) must be smaller than "
                            f"embedding.window ({embedding.window})")
    if device is None:
        device = choose_device(settings.device, [], "embed")
        print(f"ESM-2 runs on {summary(describe(device))}", flush=True)  # stdout: stderr is for what went wrong
    return load_esm(settings.esm.model, settings.esm.repr_layer, device=device)


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
    """Starts of the fewest ``window``-long windows covering ``length`` with ``overlap``, spread evenly."""
    if length <= window:
        return [0]
    n = math.ceil((length - overlap) / (window - overlap))
    return [i * (length - window) // (n - 1) for i in range(n)]


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
    """The weights on ``device`` (matmuls in ``dtype``, the rest fp32), cached for one device/dtype."""
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

    On CUDA under autocast (bf16, else fp16) with residual stream and norms in fp32; returns fp32.
    Give CPU tokens to avoid a device sync (padding is checked there).
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


class _Piece(NamedTuple):
    item: int  # index into the item list
    start: int  # first residue of this window
    length: int  # residues in this window


def _add_window(total: np.ndarray, count: np.ndarray, rows: np.ndarray, p: _Piece) -> None:
    """Add one window's rows (<cls>, its residues, <eos>) into a sequence's sums (L + 2 rows):
    residues where they are, <cls> only from the first window, <eos> only from the last."""
    residues = len(total) - rows_of(0)
    first = residue_rows(0).start  # the row of residue 0
    span = slice(first + p.start, first + p.start + p.length)
    total[span] += rows[residue_rows(p.length)]
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
    max_tokens_per_batch: int | None = None,
    batch_size: int | None = None,
    window: int | None = None,
    overlap: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Iterator[tuple[Hashable, np.ndarray]]:
    """Yield ``(key, float32 (L + 2, embed_dim))`` per item ``(key, residues, mask)``: ESM-2's
    output at <cls> (row 0), at residue i (row i + 1) and at <eos> (row L + 1) of the input
    ``<cls> residues <eos>`` with <mask> where ``mask`` is True. An empty sequence gives the
    2 rows of ``<cls><eos>``.

    Batches are length-sorted under a padded-token budget. Sequences longer than ``window`` are
    embedded as overlapping windows, averaged where they overlap. Keys come out in the order their
    batches finish, each exactly once.
    """
    from ptm_mamba.config import schema_default  # None: the embedding section's defaults

    if max_tokens_per_batch is None:
        max_tokens_per_batch = schema_default("embedding.max_tokens_per_batch")
    if window is None:
        window = schema_default("embedding.window")
    if overlap is None:
        overlap = schema_default("embedding.overlap")
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
    batches = plan_batches([rows_of(p.length) for p in pieces], max_tokens_per_batch, batch_size)
    n_windows = np.bincount(np.array([p.item for p in pieces], dtype=np.int64), minlength=len(ids))
    partial: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # item -> (row sums, counts, windows left)

    def launch(batch: list[int]):
        bp = [pieces[j] for j in batch]
        width = max(p.length for p in bp)
        toks = np.full((len(bp), rows_of(width)), alphabet.padding_idx, dtype=np.int64)
        for r, p in enumerate(bp):
            toks[r, 0] = alphabet.cls_idx
            toks[r, residue_rows(p.length)] = ids[p.item][p.start:p.start + p.length]
            toks[r, rows_of(p.length) - 1] = alphabet.eos_idx
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
            rows = out[r, :rows_of(p.length)]
            if n_windows[p.item] == 1:
                yield keys[p.item], rows.copy()
                continue
            total, count, left = partial.get(p.item) or (
                np.zeros((rows_of(len(ids[p.item])), out.shape[-1]), np.float32),
                np.zeros(rows_of(len(ids[p.item])), np.float32), n_windows[p.item])
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
