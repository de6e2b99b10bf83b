"""One batch through the model: the forward (with ESM-2 run on the fly where needed), the loss
and the counts behind the metrics. Training, evaluation, inference and the benchmarks share it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import Batch
from .tokenizer import PAD_ID, is_ptm

SUM_FIELDS = ("loss_sum", "predicted", "correct", "ptm_predicted", "ptm_correct", "tokens")


def esm_features(batch: Batch, esm_model) -> torch.Tensor | None:
    """The ESM-2 features that reach the model, (B, T, dim): ESM-2's output at every position of
    ``<cls> residues <eos>``, zeros at padding. Precomputed: the batch's (float16, as stored);
    on the fly (``esm_model`` given): ESM-2 run on the batch's masked input, as the original trains.
    int8 features are dequantised here, on the batch's device."""
    if esm_model is None:
        if batch.esm_scales is not None:
            return batch.esm_features.float() * batch.esm_scales.unsqueeze(-1)
        return batch.esm_features
    from .esm import esm_forward

    features = esm_forward(esm_model, batch.esm_tokens).clone()  # a normal tensor, not an inference one
    return features.masked_fill_((batch.labels == PAD_ID).unsqueeze(-1), 0.0)


def forward_batch(model, batch: Batch, esm_model):
    """The model's output (logits, hidden states) for a batch already on the device."""
    return model(batch.input_ids, esm_features(batch, esm_model), batch.lengths)


def batch_sums(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss over predicted positions, and the sums of :data:`SUM_FIELDS` (a float64 vector)."""
    pred = batch.pred_mask
    target = batch.labels[pred]
    picked = logits[pred].float()
    loss = F.cross_entropy(picked, target) if target.numel() else logits.sum() * 0.0
    with torch.no_grad():
        hit = picked.argmax(-1) == target
        ptm = is_ptm(target)
        sums = torch.tensor([float(loss) * target.numel(), target.numel(), hit.sum(), ptm.sum(),
                             (hit & ptm).sum(), (batch.labels != PAD_ID).sum()],
                            dtype=torch.float64, device=logits.device)
    return loss, sums


def rates(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    s = dict(zip(SUM_FIELDS, sums.tolist()))
    loss = s["loss_sum"] / max(1.0, s["predicted"])
    return {f"{prefix}_loss": loss, f"{prefix}_acc": s["correct"] / max(1.0, s["predicted"]),
            f"{prefix}_ptm_acc": s["ptm_correct"] / max(1.0, s["ptm_predicted"]),
            f"{prefix}_perplexity": math.exp(min(loss, 50.0))}
