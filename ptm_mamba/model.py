"""The PTM-Mamba network: gated token/ESM-2 fusion, bidirectional Mamba blocks, tied LM head.

Follows the published model (Peng et al., programmablebio/ptm-mamba, ``lm.py``):

    tok = embedding(input_ids)                          (B, L, d)
    esm = esm_head(esm_features)  or zeros              (B, L, d)
    g   = sigmoid(gate([tok ; esm]))                     (B, L, 1)
    h   = g * tok + (1 - g) * esm
    for each layer: prenorm residual Mamba blocks (mamba-ssm ``Block`` order)
    logits = lm_head(norm_f(h + residual)),  lm_head tied to the embedding

Deliberate changes: the backward stack reverses each protein within its own length
(:func:`reverse_padded`); the original's ``flip([1])`` put padding first, so outputs depended on
batch mates. ``model_type: mamba`` uses the same gate (the original's had none; never published).
Parameter names follow the original checkpoint layout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ptm_mamba.errors import PipelineError
from ptm_mamba.mamba_block import make_mixer
from ptm_mamba.tokenizer import PAD_ID, VOCAB

MODEL_TYPES = ("bidirectional_mamba", "mamba")


@dataclass
class ModelConfig:
    """Network shape. Plain values only, so it round-trips through YAML and checkpoints.

    ``scan`` picks the Mamba blocks' kernels (:mod:`ptm_mamba.mamba_block`): speed, not the model.
    Older checkpoints call it ``backend``. Defaults match the config schema's (tests/test_model.py).
    """

    model_type: str = "bidirectional_mamba"
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = len(VOCAB)
    esm_dim: int = 1280  # ESM-2 650M, the published model's
    use_esm: bool = True
    ssm_cfg: dict = field(default_factory=dict)
    norm_eps: float = 1e-5
    scan: str = "auto"

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise PipelineError(
                f"model config: model_type {self.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        values = dict(values)
        if "backend" in values:  # its name in checkpoints written before it was called scan
            values.setdefault("scan", values.pop("backend"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PipelineError(f"model config: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if "ssm_cfg" in values:
            values["ssm_cfg"] = dict(values["ssm_cfg"] or {})
        return cls(**values)


class ModelOutput(NamedTuple):
    logits: torch.Tensor         # (B, L, vocab_size)
    hidden_states: torch.Tensor  # (B, L, d_model), after the final norm


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row of ``x`` (B, L, ...) within its length; positions >= length stay put.

    Its own inverse.
    """
    batch, seq_len = x.shape[:2]
    t = torch.arange(seq_len, device=x.device).expand(batch, seq_len)
    n = lengths.to(device=x.device, dtype=t.dtype).unsqueeze(1)
    index = torch.where(t < n, n - 1 - t, t)                        # (B, L)
    index = index.view(batch, seq_len, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class Block(nn.Module):
    """mamba-ssm's prenorm block: residual += hidden; hidden = mixer(norm(residual)).

    Unfused (same math); the residual stream is kept in fp32.
    """

    def __init__(self, d_model: int, layer_idx: int, config: ModelConfig):
        super().__init__()
        self.mixer = make_mixer(d_model, layer_idx=layer_idx, scan=config.scan, **config.ssm_cfg)
        self.norm = nn.RMSNorm(d_model, eps=config.norm_eps)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else hidden + residual
        residual = residual.float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


class Backbone(nn.Module):
    """Embedding, gate, Mamba stacks and final norm; returns normalized hidden states."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.bidirectional = config.model_type == "bidirectional_mamba"
        self.embedding = nn.Embedding(config.vocab_size, d)
        self.gate = nn.Linear(2 * d, 1)
        if self.bidirectional:
            self.forward_layers = nn.ModuleList(Block(d, i, config) for i in range(config.n_layer))
            self.backward_layers = nn.ModuleList(Block(d, i, config) for i in range(config.n_layer))
            self.hidden_fc = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(config.n_layer))
        else:
            self.layers = nn.ModuleList(Block(d, i, config) for i in range(config.n_layer))
        self.norm_f = nn.RMSNorm(d, eps=config.norm_eps)

    def fuse(self, tok: torch.Tensor, esm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.sigmoid(self.gate(torch.cat([tok, esm], dim=-1)))
        return g * tok + (1 - g) * esm, g

    def forward(self, input_ids: torch.Tensor, esm: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor:
        tok = self.embedding(input_ids)
        hidden, _ = self.fuse(tok, torch.zeros_like(tok) if esm is None else esm)
        residual = None
        if self.bidirectional:
            for f_layer, b_layer, fc in zip(self.forward_layers, self.backward_layers, self.hidden_fc):
                hidden_f, residual_f = f_layer(hidden, residual)
                hidden_b, residual_b = b_layer(
                    reverse_padded(hidden, lengths),
                    None if residual is None else reverse_padded(residual, lengths),
                )
                hidden = fc(torch.cat([hidden_f, reverse_padded(hidden_b, lengths)], dim=-1))
                residual = 0.5 * (residual_f + reverse_padded(residual_b, lengths))
        else:
            for layer in self.layers:
                hidden, residual = layer(hidden, residual)
        residual = hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


def no_weight_decay(name: str) -> bool:
    """True for parameters AdamW must not decay: biases, ``A_log``, ``D`` and RMSNorm weights."""
    parts = name.split(".")
    leaf, owner = parts[-1], (parts[-2] if len(parts) > 1 else "")
    return leaf in ("bias", "A_log", "D") or owner in ("norm", "norm_f")


class PTMMamba(nn.Module):
    """PTM-Mamba masked language model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.esm_head = nn.Linear(config.esm_dim, config.d_model, bias=False)
        self._init_weights()
        self.lm_head.weight = self.backbone.embedding.weight  # tied: one tensor, two names

    def _init_weights(self, initializer_range: float = 0.02) -> None:
        """The original's init (GPT-2 style 1/sqrt(n_layer) scaling of each ``out_proj``)."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=initializer_range)
        for name, p in self.named_parameters():
            if name.endswith("mixer.out_proj.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(self.config.n_layer)

    def forward(
        self,
        input_ids: torch.Tensor,
        esm_features: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, L) right-padded; esm_features (B, L, esm_dim) or None (zeros, the gate
        still applied, as in the original); lengths (B,), else the non-pad tokens of each row."""
        if lengths is None:
            lengths = (input_ids != PAD_ID).sum(dim=1)
        esm = None
        if self.config.use_esm and esm_features is not None:
            expected = (*input_ids.shape, self.config.esm_dim)
            if tuple(esm_features.shape) != expected:
                raise PipelineError(
                    f"ESM features have shape {tuple(esm_features.shape)}, expected {expected} "
                    f"(input_ids {tuple(input_ids.shape)}, esm_dim {self.config.esm_dim})"
                )
            esm = self.esm_head(esm_features.to(self.esm_head.weight.dtype))
        hidden = self.backbone(input_ids, esm, lengths)
        return ModelOutput(logits=self.lm_head(hidden), hidden_states=hidden)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups [decayed, not decayed] (the original decayed every parameter)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if no_weight_decay(name) else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied embedding/LM head counted once)."""
        return sum(p.numel() for p in self.parameters())
