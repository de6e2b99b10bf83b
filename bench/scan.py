"""Seconds per selective scan: ``ptm_mamba.scan.selective_scan`` against the sequential reference.

Inputs are one Mamba block's at the paper's size (batch 1, d_inner 1536, d_state 16, length 1024),
called as the block calls it (D, z, delta_bias, delta_softplus=True). "fwd" is a forward pass
under no_grad, "fwd+bwd" a forward and a backward pass of sum(out * w). Each number is the median
of --repeats timed runs after one untimed warm-up (the reference: one run, no warm-up). On a GPU
where ``mamba_ssm`` imports, its fused ``selective_scan_fn`` is timed too. --scan is selective_scan's
``scan`` (auto, torch: the PyTorch scan, triton: ``ptm_mamba.scan_triton``; model.scan in the config);
with several, each is timed in turn ("ours[torch]", "ours[triton]"), and the Triton configs the
autotuner chose are printed. --chunk and --block set the Triton scan's chunk length and pin its
config (``scan_triton.configure``). The last line says what ran (a kernel that failed fell back).

    python bench/scan.py                                   # CPU, 2 threads (reference fwd+bwd ~40 s)
    python bench/scan.py --skip-ref-backward
    python bench/scan.py --device cuda --repeats 20
    python bench/scan.py --device cuda --batch 16 --scan torch triton --chunk 64 --skip-ref

``main()`` returns the numbers as a dict.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from typing import Callable

import torch

from ptm_mamba import scan_triton
from ptm_mamba.mamba_block import check_scan
from ptm_mamba.kernels import what_ran
from ptm_mamba.scan import selective_scan, selective_scan_ref


def make_inputs(batch: int, dim: int, nstate: int, length: int, device: str) -> dict[str, torch.Tensor]:
    """Inputs shaped and scaled like a freshly initialised block's (S4D-real A, dt bias in [1e-3, 0.1])."""
    g = torch.Generator().manual_seed(0)
    dt = torch.exp(torch.rand(dim, generator=g) * math.log(0.1 / 0.001) + math.log(0.001))
    x = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": 0.1 * torch.randn(batch, dim, length, generator=g),
        "A": -torch.arange(1, nstate + 1.0).repeat(dim, 1),
        "B": torch.randn(batch, nstate, length, generator=g),
        "C": torch.randn(batch, nstate, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }
    return {k: v.to(device) for k, v in x.items()}


def seconds(fn: Callable[[], object], repeats: int, warmup: bool, device: str) -> float:
    """Median wall time of fn() over `repeats` runs."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_scan(
    scan: Callable, inputs: dict[str, torch.Tensor], repeats: int, warmup: bool, device: str, backward: bool = True
) -> dict[str, float]:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    weight = torch.randn_like(inputs["u"])

    def forward() -> None:
        with torch.no_grad():
            scan(**inputs, delta_softplus=True)

    def forward_backward() -> None:
        (scan(**leaves, delta_softplus=True) * weight).sum().backward()

    result = {"fwd": seconds(forward, repeats, warmup, device)}
    if backward:
        result["fwd+bwd"] = seconds(forward_backward, repeats, warmup, device)
    return result


def triton_configs() -> dict[str, str]:
    """The autotuner's last choice per Triton scan kernel, as "BLOCK_DxWARPS"; empty if none ran."""
    chosen = {}
    for name, kernel in (("fwd", scan_triton._fwd_kernel), ("bwd", scan_triton._bwd_kernel)):
        config = getattr(kernel, "best_config", None)
        if config is not None:
            chosen[name] = f"{config.kwargs['BLOCK_D']}x{config.num_warps}"
    return chosen


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of the fast scans")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=1536, help="d_inner")
    p.add_argument("--state", type=int, default=16, help="d_state")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--skip-ref", action="store_true", help="do not time the reference at all")
    p.add_argument("--skip-ref-backward", action="store_true", help="time only the reference's forward")
    p.add_argument("--scan", nargs="+", default=["auto"], choices=("auto", "torch", "triton"),
                   help="selective_scan's scan (model.scan); several: time each")  # fmt: skip
    p.add_argument("--chunk", type=int, default=scan_triton.DEFAULT_CHUNK, help="the Triton scan's chunk length")
    p.add_argument("--block", metavar="BLOCK_DxWARPS", help="pin the Triton scan's config, e.g. 32x4 (no autotuning)")
    args = p.parse_args(argv)
    for choice in args.scan:
        check_scan(choice)
    if scan_triton.unavailable() is None:
        scan_triton.configure(args.chunk, args.block)

    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.batch, args.dim, args.state, args.length, args.device)
    shape = (args.batch, args.dim, args.state, args.length)
    print(f"device {args.device}, threads {torch.get_num_threads()}, (batch, d_inner, d_state, length) = {shape}")
    results: dict[str, dict[str, float]] = {}
    for choice in args.scan:
        name = "ours" if len(args.scan) == 1 else f"ours[{choice}]"
        scan = functools.partial(selective_scan, scan=choice)
        results[name] = time_scan(scan, inputs, args.repeats, True, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            time_scan(scan, inputs, 1, False, args.device)
            results[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.device.startswith("cuda"):
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception as e:  # noqa: BLE001 - any failure to load the CUDA extension
            print(f"mamba_ssm not timed: {type(e).__name__}: {e}")
        else:
            results["mamba_ssm"] = time_scan(selective_scan_fn, inputs, args.repeats, True, args.device)
    if not args.skip_ref:
        results["reference"] = time_scan(selective_scan_ref, inputs, 1, False, args.device, not args.skip_ref_backward)

    tuned = triton_configs()
    if tuned:
        print("triton configs chosen (--block form): " + "  ".join(f"{k} {v}" for k, v in tuned.items()))
    for name, r in results.items():
        print(f"{name:14s} " + "  ".join(f"{k} {v:.4f}{'' if k == 'peak_gib' else ' s'}" for k, v in r.items()))
    if "reference" in results:
        ref = results["reference"]
        for name in (n for n in results if n.startswith("ours")):
            print(f"reference / {name}: " + "  ".join(f"{k} {ref[k] / results[name][k]:.1f}x" for k in ref))
    print(f"ran: {what_ran()}")
    return results


if __name__ == "__main__":
    main()
