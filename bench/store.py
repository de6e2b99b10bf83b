"""Benchmark of the embedding store: write synthetic shards, gather them, measure reads.

    python bench/store.py                          # 2,000 proteins x ~350 residues, dim 320, 4 shards
    python bench/store.py --dim 1280 --proteins 500

Reads right after writing come mostly from the OS page cache, so they are an
upper bound for a cold shared filesystem. ``measure_read`` is importable
(bench/embed.py uses it on real files).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ptm_mamba.embedding_store import EmbeddingReader, ShardWriter, gather

ATTRS = {
    "esm_model": "synthetic", "repr_layer": 0, "split": "bench", "split_fingerprint": "bench",
    "mask_prob": 0.15, "mask_seed": 0,
}


def write_synthetic(folder: Path, proteins: int, shards: int, dim: int, replicates: int,
                    mean_len: int = 350, seed: int = 0) -> list[Path]:
    """Shards of random float16 features; lengths ~ mean_len +- 50%. Returns the shard paths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2, size=proteins)
    pool = rng.standard_normal((4 * mean_len, dim)).astype(np.float16)  # sliced, not regenerated
    paths = []
    for s in range(shards):
        path = folder / f"bench_{s}.h5"
        attrs = {**ATTRS, "shard_index": s, "num_shards": shards}
        with ShardWriter(path, dim=dim, replicates=replicates, attrs=attrs) as w:
            for i in range(s, proteins, shards):
                L = int(lengths[i])
                feats = [pool[(i + k) % mean_len:][:L] for k in range(replicates)]
                masks = [rng.random(L) < 0.15 for _ in range(replicates)]
                w.add(f"P{i:07d}", feats, masks)
        paths.append(path)
    return paths


def _rate(rows: int, nbytes: int, reads: int, seconds: float) -> dict[str, float]:
    return {
        "residues_per_s": rows / seconds, "mb_per_s": nbytes / seconds / 1e6,
        "proteins_per_s": reads / seconds, "seconds": seconds,
    }


def measure_read(path: str | Path, n_reads: int, *, batch_size: int = 32, replicate: int = 0,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """Read throughput of an embedding file for three access patterns.

    random_single: ``get`` of n_reads random ids; random_batched: ``get_many`` of random
    batches of ``batch_size`` (n_reads ids in all); sequential: ``get_many`` over the first
    n_reads ids in file order (batches merge into contiguous reads). MB counts features+masks.
    """
    reader = EmbeddingReader(path)
    ids = reader.ids
    n_reads = min(n_reads, len(ids))
    rng = np.random.default_rng(seed)
    random_ids = [ids[i] for i in rng.integers(0, len(ids), size=n_reads)]
    reader.get(ids[0], replicate)  # open the file and its sources outside the timing

    def run(batches, single: bool) -> dict[str, float]:
        rows = nbytes = reads = 0
        t0 = time.perf_counter()
        for batch in batches:
            items = [reader.get(batch[0], replicate)] if single else reader.get_many(batch, replicate)
            for x, m in items:
                rows += len(m)
                nbytes += x.nbytes + m.nbytes
            reads += len(items)
        return _rate(rows, nbytes, reads, time.perf_counter() - t0)

    batches = lambda seq: [seq[i:i + batch_size] for i in range(0, len(seq), batch_size)]  # noqa: E731
    result = {
        "random_single": run([[i] for i in random_ids], single=True),
        "random_batched": run(batches(random_ids), single=False),
        "sequential": run(batches(ids[:n_reads]), single=False),
    }
    reader.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proteins", type=int, default=2000, help="proteins in all shards together")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--dim", type=int, default=320, choices=[320, 480, 640, 1280, 2560])
    ap.add_argument("--replicates", type=int, default=2)
    ap.add_argument("--reads", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    args = ap.parse_args()

    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench_store_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        paths = write_synthetic(folder / "shards", args.proteins, args.shards, args.dim, args.replicates)
        t_write = time.perf_counter() - t0
        written = sum(p.stat().st_size for p in paths)
        out = folder / "bench_embeddings.h5"
        t0 = time.perf_counter()
        gather(paths, out)
        t_gather = time.perf_counter() - t0
        print(f"write: {args.proteins} proteins, dim {args.dim}, K={args.replicates}: {written / 1e6:.0f} MB "
              f"in {t_write:.2f} s ({written / 1e6 / t_write:.0f} MB/s)")
        print(f"gather (incl. NaN scan of all shards): {t_gather:.2f} s, "
              f"gathered file {out.stat().st_size / 1e3:.0f} kB")
        for name, file in (("shard", paths[0]), ("gathered", out)):
            for mode, r in measure_read(file, args.reads).items():
                print(f"read {name:8s} {mode:15s} {r['residues_per_s'] / 1e6:6.2f} M residues/s "
                      f"{r['mb_per_s']:8.0f} MB/s {r['proteins_per_s']:8.0f} proteins/s")
    finally:
        if args.dir is None:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
