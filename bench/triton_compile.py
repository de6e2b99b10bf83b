"""Compile the Triton scan kernels for a GPU without one: registers, spills, shared memory per config.

For kernel work on a machine with no GPU (the project's CPU machines): triton compiles ahead of time
for a named target, and ptxas (shipped with triton) reports what each config costs. No timing: a
spill-free config is not necessarily the fastest, but a config that spills is worth a look.

    python bench/triton_compile.py                      # sm_90 (H100/H200), bf16 inputs, chunk 32
    python bench/triton_compile.py --chunk 16 32 64 --dtype fp32
    python bench/triton_compile.py --config 16x4       # one config (the tests compile this one)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ptm_mamba import scan_triton  # noqa: E402

FP32_POINTERS = ("A_ptr", "D_ptr", "bias_ptr", "states_ptr", "dA_ptr", "dD_ptr", "dbias_ptr", "dB_ptr", "dC_ptr")


def signature(kernel, flags: dict, dtype: str) -> tuple[dict, dict]:
    """Argument types as triton names them: fp32 for parameters, states and partial sums, `dtype`
    for the activations and their gradients, i32 for sizes; constexprs from `flags`."""
    types, constants = {}, {}
    for name in kernel.arg_names:
        if name in flags:
            types[name], constants[name] = "constexpr", flags[name]
        elif name.endswith("_ptr"):
            types[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
        else:
            types[name] = "i32"
    return types, constants


def ptxas_report(ptx: str, arch: int) -> str:
    """ptxas -v's summary of a kernel: registers, spill stores and loads."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()), None)
    if ptxas is None:
        return "(no ptxas in triton's package)"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(src) + ".o"],
                             capture_output=True, text=True)  # fmt: skip
    lines = [line.split("info    : ")[-1].strip() for line in out.stderr.splitlines()
             if "Used" in line or "spill" in line]  # fmt: skip
    return "; ".join(lines) or out.stderr.strip()[-300:]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--chunk", type=int, nargs="+", default=[scan_triton.DEFAULT_CHUNK])
    ap.add_argument("--nstate", type=int, default=16)
    ap.add_argument("--config", nargs="+", metavar="BLOCK_DxWARPS", help="only these configs (default: all CONFIGS)")
    args = ap.parse_args(argv)
    if scan_triton.INTERPRET:
        sys.exit("triton_compile.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

    target = GPUTarget("cuda", args.arch, 32)
    common = dict(NSTATE=args.nstate, N_PAD=max(triton.next_power_of_2(args.nstate), 2),
                  HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)  # fmt: skip
    kernels = ((scan_triton._fwd_kernel, {"STORE_STATES": True}), (scan_triton._bwd_kernel, {}))
    for autotuned, extra in kernels:
        kernel = autotuned.fn  # the JITFunction under the autotuner
        for chunk in args.chunk:
            configs = [tuple(map(int, c.split("x"))) for c in args.config] if args.config else scan_triton.CONFIGS
            for block_d, warps in configs:
                flags = dict(common, **extra, CHUNK=chunk, BLOCK_D=block_d)
                types, constants = signature(kernel, flags, args.dtype)
                start = time.perf_counter()
                compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constants),
                                          target=target, options={"num_warps": warps})  # fmt: skip
                seconds = time.perf_counter() - start
                print(f"{kernel.__name__:12s} chunk {chunk:3d}  {block_d:2d}x{warps}  "
                      f"shared {compiled.metadata.shared:6d} B  compile {seconds:4.1f} s (0 if cached)  "
                      f"{ptxas_report(compiled.asm['ptx'], args.arch)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
