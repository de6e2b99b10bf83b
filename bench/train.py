"""Training throughput: tokens/s with precomputed ESM-2 features vs ESM-2 on the fly.

Both modes run the real training pieces (BatchBuilder, the model, forward_batch,
batch_sums, AdamW) on the same synthetic proteins and batches; only where the
ESM-2 features come from differs:

- precomputed: read from a real HDF5 store (written here with random features,
  as the embed stage would write them), batch by batch;
- on the fly: ESM-2 runs on the masked input of every batch, as the original does.

ESM-2 weights are random (no download): the architecture sets the cost.

    python bench/train.py                                   # demo config on CPU (ESM-2 8M arch)
    python bench/train.py --device cuda --paper             # paper size: d_model 768, 24 layers, ESM-2 650M
    python bench/train.py --device cuda --paper --scan triton --chunk 64 --block 32x4

--scan is the config's model.scan; --chunk and --block tune the Triton scan (``scan_triton.configure``).
The results say which kernels ran ("ran"): one that failed and fell back to PyTorch shows there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ptm_mamba import scan_triton  # noqa: E402
from ptm_mamba.batching import epoch_batches  # noqa: E402
from ptm_mamba.data import BatchBuilder, EpochBatches, collate_single  # noqa: E402
from ptm_mamba.dataset import Protein  # noqa: E402
from ptm_mamba.embedding_store import EmbeddingReader, ShardWriter  # noqa: E402
from ptm_mamba.esm import EsmModel  # noqa: E402
from ptm_mamba.mamba_block import SCANS  # noqa: E402
from ptm_mamba.model import ModelConfig, PTMMamba  # noqa: E402
from ptm_mamba.kernels import what_ran  # noqa: E402
from ptm_mamba.tokenizer import PAD_ID, PTM_TOKENS  # noqa: E402
from ptm_mamba.forward import batch_sums, forward_batch  # noqa: E402

ESM_ARCHS = {"8M": (6, 320, 20), "650M": (33, 1280, 20)}  # layers, dim, heads


def synthetic_proteins(n: int, seed: int = 0) -> list[Protein]:
    rng = np.random.default_rng(seed)
    residues = list("ACDEFGHIKLMNPQRSTVWY")
    out = []
    for i in range(n):
        length = int(np.clip(rng.lognormal(np.log(300), 0.5), 40, 1000))
        tokens = [residues[j] for j in rng.integers(0, 20, length)]
        for j in rng.choice(length, size=max(1, length // 60), replace=False):
            tokens[j] = PTM_TOKENS[int(rng.integers(0, len(PTM_TOKENS)))]
        out.append(Protein(f"P{i}", "".join(tokens), tuple(tokens)))
    return out


def random_esm(arch: str, device) -> EsmModel:
    import esm

    layers, dim, heads = ESM_ARCHS[arch]
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model = esm.model.esm2.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet)
    return EsmModel.wrap(model, alphabet, f"random-esm2-{arch}", None, device)


def write_store(proteins, dim: int, path: Path) -> EmbeddingReader:
    rng = np.random.default_rng(1)
    attrs = {"esm_model": "random", "repr_layer": 0, "split": "train", "split_fingerprint": "bench",
             "mask_prob": 0.15, "mask_seed": 0}
    with ShardWriter(path, dim=dim, replicates=1, attrs=attrs) as w:
        for p in proteins:  # rows <cls>, residues, <eos>, as the embed stage stores them
            w.add(p.id, [rng.standard_normal((p.length + 2, dim), dtype=np.float32)],
                  [np.concatenate([[False], rng.random(p.length) < 0.15, [False]])])
    return EmbeddingReader(path)


def measure(model, builder, batches, esm_model, device, steps: int, warmup: int, workers: int) -> dict:
    """Steps as the trainer runs them: batches assembled by DataLoader workers (pinned on CUDA)."""
    optimizer = torch.optim.AdamW(model.param_groups(0.01), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    loader = torch.utils.data.DataLoader(
        EpochBatches(builder, batches[: warmup + steps], seed=0, epoch=0, replicate=0), batch_size=None,
        collate_fn=collate_single, num_workers=workers, pin_memory=device.type == "cuda")
    tokens, elapsed = 0, 0.0
    t0 = time.perf_counter()
    for n, batch in enumerate(loader):
        batch = batch.to(device)
        with autocast:
            logits = forward_batch(model, batch, esm_model).logits
        loss, _ = batch_sums(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if n >= warmup:
            elapsed += time.perf_counter() - t0
            tokens += int((batch.labels != PAD_ID).sum())
        t0 = time.perf_counter()
    return {"tokens_per_s": tokens / elapsed, "steps": steps, "tokens": tokens, "seconds": elapsed}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--paper", action="store_true", help="d_model 768, 24 layers, ESM-2 650M, 16k-token batches")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--esm-arch", choices=sorted(ESM_ARCHS), default="8M")
    ap.add_argument("--max-tokens", type=int, default=100000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers assembling batches")
    ap.add_argument("--scan", choices=SCANS, default="auto", help="model.scan: the Mamba blocks' kernels")
    ap.add_argument("--chunk", type=int, default=scan_triton.DEFAULT_CHUNK, help="the Triton scan's chunk length")
    ap.add_argument("--block", metavar="BLOCK_DxWARPS", help="pin the Triton scan's config, e.g. 32x4 (no autotuning)")
    args = ap.parse_args(argv)
    if scan_triton.unavailable() is None:
        scan_triton.configure(args.chunk, args.block)
    if args.paper:
        args.d_model, args.n_layer, args.esm_arch = 768, 24, "650M"
        args.max_tokens, args.batch_size = 16384, 64
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    proteins = synthetic_proteins(max(64, (args.steps + args.warmup) * args.batch_size))
    esm_model = random_esm(args.esm_arch, device)
    dim = esm_model.embed_dim
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "d_model": args.d_model, "n_layer": args.n_layer, "esm": args.esm_arch,
               "max_tokens": args.max_tokens, "batch_size": args.batch_size, "workers": args.workers,
               "scan": args.scan}
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(proteins, dim, Path(tmp) / "train.h5")
        for mode in ("precomputed", "on_the_fly"):
            builder = BatchBuilder(proteins, max_sequence_length=1024, mask_prob=0.15, random_mask_only_prob=0.2,
                                   store=store if mode == "precomputed" else None,
                                   esm_alphabet=esm_model.alphabet if mode == "on_the_fly" else None)
            batches = epoch_batches(builder.lengths, args.max_tokens, args.batch_size, seed=0, epoch=0)
            torch.manual_seed(0)
            model = PTMMamba(ModelConfig(d_model=args.d_model, n_layer=args.n_layer, esm_dim=dim,
                                         scan=args.scan)).to(device)
            results[mode] = measure(model, builder, batches, esm_model if mode == "on_the_fly" else None,
                                    device, args.steps, args.warmup, args.workers)
            print(f"{mode:12s} {results[mode]['tokens_per_s']:10.0f} tokens/s", flush=True)
    results["precomputed_over_on_the_fly"] = results["precomputed"]["tokens_per_s"] / \
        results["on_the_fly"]["tokens_per_s"]
    print(f"precomputed / on the fly: {results['precomputed_over_on_the_fly']:.2f}x")
    results["ran"] = what_ran()
    print(f"ran: {results['ran']}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
