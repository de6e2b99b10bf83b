"""Benchmark of the embedding store: write synthetic shards, gather them, measure reads.

    python bench/store.py                          # 2,000 proteins x ~350 residues, dim 320, 4 shards
    python bench/store.py --dim 1280 --proteins 500
    python bench/store.py --gather                 # the gather's cost: CPU seconds per GB, peak memory
    python bench/store.py --dim 1280 --replicates 4 --proteins 500 --loader   # the training loader, paper width
    python bench/store.py --paper                  # the same for float16 and int8 stores, + one DataLoader worker

``--loader`` reads the gathered file through the training's own batch assembly
(``ptm_mamba.data.BatchBuilder``: reads, checks, crops, pads, masks) and reports MB of features
per CPU second of this process (``resource.getrusage``, user + system), a figure that stays
comparable on a shared machine. Features count as float16 (2 bytes a value) whatever the store's
dtype, so float16 and int8 figures compare (int8 is "fp16-equivalent"). ``--paper`` runs it for
both dtypes at the paper's width (dim 1280, K = 4), and once more through a DataLoader with one
worker process, whose CPU seconds (the worker's and this process's) are counted.

``--gather`` runs ``gather`` (which copies the shards into one file) in a child process and
reports its CPU time (``resource.getrusage``, user + system), wall time and peak RSS per GB of
shard data, with and without the NaN/Inf scan, beside a plain file copy of the same bytes.

Reads right after writing come mostly from the OS page cache, so they are an
upper bound for a cold shared filesystem. ``measure_read`` is importable
(bench/embed.py uses it on real files).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
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
                    mean_len: int = 350, seed: int = 0, dtype: str = "float16") -> list[Path]:
    """Shards of random features (stored as ``dtype``) written by the embed stage's writer;
    lengths ~ mean_len +- 50%. Returns the shard paths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2, size=proteins)
    pool = rng.standard_normal((4 * mean_len, dim)).astype(np.float16)  # sliced, not regenerated
    paths = []
    for s in range(shards):
        path = folder / f"bench_{s}.h5"
        attrs = {**ATTRS, "shard_index": s, "num_shards": shards}
        with ShardWriter(path, dim=dim, replicates=replicates, attrs=attrs, dtype=dtype) as w:
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


def _cpu_seconds(children: bool = False) -> float:
    """CPU seconds (user + system) of this process, and with ``children`` of its ended child processes."""
    usages = [resource.getrusage(resource.RUSAGE_SELF)]
    if children:
        usages.append(resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


def measure_loader(path: str | Path, *, batch_size: int = 32, replicate: int = 0, seed: int = 0,
                   workers: int = 0) -> dict[str, float]:
    """One epoch of training batches of every protein in ``path`` (random order, ``batch_size`` proteins,
    no cropping) built by the training's BatchBuilder over synthetic residues of the stored lengths.
    Features count as float16 (<cls> and <eos> rows included, padding not). ``workers`` > 0: through
    a DataLoader with that many worker processes, whose CPU time counts (``RUSAGE_CHILDREN``)."""
    import torch

    from ptm_mamba.data import BatchBuilder
    from ptm_mamba.dataset import Protein
    from ptm_mamba.tokenizer import ROWS_AROUND_RESIDUES

    reader = EmbeddingReader(path)
    ids, rows = reader.ids, reader.row_counts(reader.ids)
    rng = np.random.default_rng(seed)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    proteins = []
    for pid, r in zip(ids, rows):
        tokens = tuple(letters[rng.integers(0, len(letters), int(r) - ROWS_AROUND_RESIDUES)])
        proteins.append(Protein(pid, "".join(tokens), tokens))
    builder = BatchBuilder(proteins, max_sequence_length=int(rows.max()), mask_prob=0.15,
                           random_mask_only_prob=0.2, store=reader)
    order = rng.permutation(len(proteins))
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    row_bytes = 2 * reader.attrs["dim"]
    nbytes = sum(int(rows[batch].sum()) * row_bytes for batch in batches)
    if workers:
        from ptm_mamba.data import EpochBatches, collate_single

        reader.close()  # each worker opens the file itself
        cpu, wall = _cpu_seconds(True), time.perf_counter()
        epoch = EpochBatches(builder, batches, seed=seed, epoch=0, replicate=replicate)
        for _ in torch.utils.data.DataLoader(epoch, batch_size=None, collate_fn=collate_single,
                                             num_workers=workers):
            pass
        cpu, wall = _cpu_seconds(True) - cpu, time.perf_counter() - wall
    else:
        generator = torch.Generator().manual_seed(seed)
        builder.build(batches[0], replicate=replicate, generator=generator)  # open the file outside the timing
        cpu, wall = _cpu_seconds(), time.perf_counter()
        for batch in batches:
            builder.build(batch, replicate=replicate, generator=generator)
        cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    reader.close()
    return {"mb": nbytes / 1e6, "cpu_s": cpu, "wall_s": wall, "mb_per_cpu_s": nbytes / 1e6 / cpu,
            "batches": len(batches)}


def _gather(paths: list[Path], out: Path, check_values: bool) -> None:
    gather(paths, out, check_values=check_values)


def _copy(paths: list[Path], out: Path, check_values: None) -> None:
    """A plain copy of the shard files' bytes, synced as gather syncs its output: the floor."""
    out.mkdir()
    for p in paths:
        shutil.copyfile(p, out / p.name)
        with open(out / p.name, "rb+") as fh:
            os.fsync(fh.fileno())


def _status_mib(key: str) -> float:
    """VmRSS / VmHWM (peak) of this process in MiB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measured(queue, target, *args) -> None:
    """In the child: ``target(*args)``'s own CPU time and wall time; its RSS before and its peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak of the target alone
    except OSError:
        pass
    rss, r0, t0 = _status_mib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    target(*args)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    queue.put({"user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime, "wall": wall,
               "rss_before_mib": rss, "rss_peak_mib": _status_mib("VmHWM")})


def measure_in_child(target, *args) -> dict[str, float]:
    """``target(*args)`` in a fresh (spawned) process, its imports done: its CPU seconds (user,
    system, ``resource.getrusage``), wall seconds and peak RSS, its own and not this process's."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measured, args=(queue, target, *args))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed (exit {proc.exitcode})")
    return result


def bench_gather(folder: Path, paths: list[Path], repeats: int) -> None:
    data = sum(p.stat().st_size for p in paths)
    print(f"shards: {len(paths)} files, {data / 1e9:.3f} GB (shards just written: reads from the page cache)")
    for name, target, check in (("gather, NaN/Inf scan on", _gather, True),
                                ("gather, no NaN/Inf scan", _gather, False), ("plain copy + fsync", _copy, None)):
        for _ in range(repeats):
            out = folder / "out"
            m = measure_in_child(target, paths, out, check)
            cpu = m["user"] + m["sys"]
            print(f"{name:24s} {cpu / (data / 1e9):5.2f} CPU s/GB (user {m['user']:.2f} s, sys {m['sys']:.2f} s), "
                  f"wall {m['wall']:.2f} s = {data / 1e6 / m['wall']:4.0f} MB/s, peak RSS {m['rss_peak_mib']:.0f} MiB "
                  f"(+{m['rss_peak_mib'] - m['rss_before_mib']:.0f})")
            shutil.rmtree(out) if out.is_dir() else out.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proteins", type=int, default=2000, help="proteins in all shards together")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--dim", type=int, default=320, choices=[320, 480, 640, 1280, 2560])
    ap.add_argument("--replicates", type=int, default=2)
    ap.add_argument("--reads", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--gather", action="store_true", help="measure the gather's cost instead of the reads")
    ap.add_argument("--repeats", type=int, default=2, help="with --gather: runs of each measurement")
    ap.add_argument("--loader", action="store_true", help="also read through the training's batch assembly")
    ap.add_argument("--dtype", default="float16", choices=["float16", "int8"], help="how the store keeps features")
    ap.add_argument("--paper", action="store_true",
                    help="dim 1280, K=4, 500 proteins: the loader for float16 and int8, in-process and one worker")
    args = ap.parse_args()
    if args.paper:
        args.dim, args.replicates, args.loader = 1280, 4, True
        args.proteins = 500 if args.proteins == ap.get_default("proteins") else args.proteins

    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench_store_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for dtype in ("float16", "int8") if args.paper else (args.dtype,):
            bench_dtype(args, folder / dtype, dtype)
    finally:
        if args.dir is None:
            shutil.rmtree(folder)


def bench_dtype(args: argparse.Namespace, folder: Path, dtype: str) -> None:
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    paths = write_synthetic(folder / "shards", args.proteins, args.shards, args.dim, args.replicates, dtype=dtype)
    t_write, cpu_write = time.perf_counter() - t0, _cpu_seconds() - cpu0
    written = sum(p.stat().st_size for p in paths)
    if args.gather:
        bench_gather(folder, paths, args.repeats)
        return
    out = folder / "bench_embeddings.h5"
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    gather(paths, out)
    t_gather, cpu_gather = time.perf_counter() - t0, _cpu_seconds() - cpu0
    with EmbeddingReader(out) as r:
        residues = int(r.row_counts(r.ids).sum())
    fp16 = residues * args.dim * 2 * args.replicates
    print(f"[{dtype}] write: {args.proteins} proteins, dim {args.dim}, K={args.replicates}: {written / 1e6:.0f} MB "
          f"({out.stat().st_size / residues / args.replicates:.0f} bytes per residue per replicate) in "
          f"{t_write:.2f} s ({fp16 / 1e6 / cpu_write:.0f} MB fp16-equivalent per CPU-s)")
    print(f"[{dtype}] gather (a copy): {t_gather:.2f} s, {cpu_gather:.2f} CPU-s "
          f"({written / 1e6 / cpu_gather:.0f} MB per CPU-s), gathered file {out.stat().st_size / 1e6:.0f} MB")
    if not args.paper:
        for name, file in (("shard", paths[0]), ("gathered", out)):
            for mode, r in measure_read(file, args.reads).items():
                print(f"read {name:8s} {mode:15s} {r['residues_per_s'] / 1e6:6.2f} M residues/s "
                      f"{r['mb_per_s']:8.0f} MB/s {r['proteins_per_s']:8.0f} proteins/s")
    if args.loader:
        for workers in (0, 1) if args.paper else (0,):
            r = measure_loader(out, workers=workers)
            where = "in this process" if not workers else f"{workers} DataLoader worker (its CPU + this process's)"
            print(f"[{dtype}] training loader (BatchBuilder, 32 proteins a batch, {where}): {r['mb']:.0f} MB of "
                  f"fp16-equivalent features in {r['batches']} batches: {r['mb_per_cpu_s']:.0f} MB per CPU-s "
                  f"({r['cpu_s']:.2f} CPU-s, {r['wall_s']:.2f} s wall)")
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
