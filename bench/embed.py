"""Residues/s of ``ptm_mamba.esm.embed`` against fair-esm's own way (scripts/extract.py).

The reference does what fair-esm's ``scripts/extract.py`` does per batch: FastaBatchedDataset
+ ``get_batch_indices(toks_per_batch, extra_toks_per_seq=1)``, the alphabet's batch converter
with ``truncation_seq_length=1022``, fp32 ``model(toks, repr_layers=[last])``, logits and
representations moved to the CPU, per-sequence rows cloned (saving skipped): ``[0 : L + 2]``,
with <cls>/<eos> as ours yields them (extract.py clones ``[1 : L + 1]``; the same work).
Both run the same model on the same random sequences (log-normal lengths around 350,
clipped to 30..1022 so neither side truncates or windows).

    python bench/embed.py                                  # tiny random checkpoint, CPU
    python bench/embed.py --arch esm2_t33_650M_UR50D --device cuda --n-seqs 2000

``main()`` returns the numbers as a dict, so other benchmarks can extend or reuse it.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch
from esm import Alphabet, FastaBatchedDataset
from esm.model.esm2 import ESM2

from ptm_mamba.esm import EsmModel, embed, load_esm
from ptm_mamba.esm_weights import ESM2_NAMES
from ptm_mamba.testing import write_tiny_esm2_checkpoint

# ESM-2 architectures: layers -> (embed_dim, attention_heads)
ARCH = {6: (320, 20), 12: (480, 20), 30: (640, 20), 33: (1280, 20), 36: (2560, 40), 48: (5120, 40)}
AA = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def random_sequences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (label, sequence) pairs, lengths log-normal around 350 clipped to 30..1022."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(350), 0.6, n).astype(int), 30, 1022)
    return [(f"seq{i}", "".join(rng.choice(AA, n_res))) for i, n_res in enumerate(lengths)]


def build_model(args, tmp: str) -> EsmModel:
    if args.arch:
        layers = int(args.arch.split("_")[1][1:])
        dim, heads = ARCH[layers]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet="ESM-1b")
        return EsmModel.wrap(module, Alphabet.from_architecture("ESM-1b"), args.arch + "-random",
                             device=args.device)
    model = args.model or str(write_tiny_esm2_checkpoint(f"{tmp}/esm2_t2_32_tiny.pt"))
    return load_esm(model, device=args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(esm_model: EsmModel, seqs, max_tokens: int, progress: bool) -> dict[str, np.ndarray]:
    items = ((label, s, None) for label, s in seqs)
    return dict(embed(esm_model, items, max_tokens_per_batch=max_tokens, progress=progress))


def run_reference(esm_model: EsmModel, seqs, max_tokens: int, dtype: str) -> dict[str, torch.Tensor]:
    """fair-esm's scripts/extract.py loop (per_tok representations of the last layer)."""
    model, alphabet, device = esm_model.model, esm_model.alphabet, esm_model.device
    layer = model.num_layers
    dataset = FastaBatchedDataset(*zip(*seqs))
    batches = dataset.get_batch_indices(max_tokens, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(1022), batch_sampler=batches)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    results = {}
    with torch.no_grad(), autocast:
        for labels, strs, toks in loader:
            toks = toks.to(device=device, non_blocking=True)
            out = model(toks, repr_layers=[layer])
            _logits = out["logits"].to(device="cpu")  # noqa: F841  (extract.py moves them too)
            reps = out["representations"][layer].to(device="cpu")
            for i, label in enumerate(labels):
                results[label] = reps[i, : min(1022, len(strs[i])) + 2].clone()  # <cls>, residues, <eos>
    return results


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="ESM-2 name or .pt path (default: a tiny random checkpoint)")
    p.add_argument("--arch", choices=ESM2_NAMES, help="random weights of this architecture (no download)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-seqs", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--ref-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="reference precision (extract.py uses fp32)")
    p.add_argument("--no-ref", action="store_true", help="time ours only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        esm_model = build_model(args, tmp)
    device = esm_model.device
    seqs = random_sequences(args.n_seqs, args.seed)
    n_res = sum(len(s) for _, s in seqs)

    warm = seqs[: max(1, min(4, len(seqs)))]  # kernels, caches, cast weights
    run_ours(esm_model, warm, args.max_tokens, False)
    ours, t_ours = timed(lambda: run_ours(esm_model, seqs, args.max_tokens, args.progress), device)
    result = {"model": esm_model.name, "device": str(device), "n_seqs": len(seqs), "n_residues": n_res,
              "max_tokens": args.max_tokens, "ours_res_per_s": n_res / t_ours}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"{esm_model.name} on {result.get('gpu', device)}: {len(seqs)} sequences, {n_res} residues, "
          f"max_tokens {args.max_tokens}")
    print(f"  ours (embed):             {result['ours_res_per_s']:12.0f} residues/s")
    if args.no_ref:
        return result

    run_reference(esm_model, warm, args.max_tokens, args.ref_dtype)
    ref, t_ref = timed(lambda: run_reference(esm_model, seqs, args.max_tokens, args.ref_dtype), device)
    diff = max(float(np.abs(ours[k] - ref[k].float().numpy()).max()) for k in ref)
    scale = max(float(ref[k].abs().max()) for k in ref)
    result.update(ref_res_per_s=n_res / t_ref, ratio=t_ref / t_ours, max_abs_diff=diff, max_abs_ref=scale)
    print(f"  fair-esm extract.py ({args.ref_dtype}): {result['ref_res_per_s']:12.0f} residues/s")
    print(f"  ratio ours/theirs: {result['ratio']:.2f}x   max |ours - theirs| {diff:.2e} "
          f"(max |theirs| {scale:.2e})")
    return result


if __name__ == "__main__":
    main()
