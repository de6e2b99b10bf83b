"""Helpers for tests and benchmarks only: tiny ESM-2 checkpoints in fair-esm's on-disk layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from esm.model.esm2 import ESM2


def random_esm2(num_layers: int = 2, embed_dim: int = 32, attention_heads: int = 4, seed: int = 0) -> ESM2:
    """fair-esm's ESM2 with random weights; layer norms and biases are perturbed too, so that a
    forward that skips or swaps any of them gives different numbers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ESM2(num_layers, embed_dim, attention_heads, alphabet="ESM-1b", token_dropout=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
                elif "layer_norm" in name or name.startswith("lm_head.layer_norm"):
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def write_tiny_esm2_checkpoint(path: str | Path, num_layers: int = 2, embed_dim: int = 32,
                               attention_heads: int = 4, seed: int = 0) -> Path:
    """Write a random ESM-2 as fair-esm's released files: ``<name>.pt`` holding
    ``{"model": state dict with "encoder.sentence_encoder." / "encoder." prefixes,
    "cfg": {"model": Namespace(encoder_layers=..., ...)}, "args": None}`` and
    ``<name>-contact-regression.pt`` beside it. fair-esm reads the format from the
    name, which must start with ``esm2``. Returns ``path``."""
    path = Path(path)
    if not path.stem.startswith("esm2") or path.suffix != ".pt":
        raise ValueError(f"{path.name}: fair-esm loads ESM-2 only from files named esm2*.pt")
    model = random_esm2(num_layers, embed_dim, attention_heads, seed)
    state = model.state_dict()
    regression = {k: v for k, v in state.items() if k.startswith("contact_head.")}
    weights = {
        ("encoder." if k.startswith("lm_head.") else "encoder.sentence_encoder.") + k: v
        for k, v in state.items() if k not in regression
    }
    cfg = argparse.Namespace(
        encoder_layers=num_layers, encoder_embed_dim=embed_dim, encoder_ffn_embed_dim=4 * embed_dim,
        encoder_attention_heads=attention_heads, token_dropout=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights, "cfg": {"model": cfg}, "args": None}, path)
    torch.save({"model": regression}, path.with_name(f"{path.stem}-contact-regression.pt"))
    return path
