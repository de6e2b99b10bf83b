"""Mamba's selective scan as Triton kernels: the fast path of `ptm_mamba.scan.selective_scan` on CUDA.

Same semantics as `selective_scan` (mamba-ssm's `selective_scan_fn` for real A and per-position B, C);
u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,). One program owns one batch
row and BLOCK_D channels, keeps their (N, BLOCK_D) state in registers (channels across threads,
each thread holding its channels' N states) and walks the L positions in order, loading position
t+1's inputs while it computes position t:

    forward   h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,   out_t = (C_t . h_t + D u_t) silu(z_t)
    backward  phase 1 recomputes every h_t into a (B, L, N, D) fp32 scratch (freed on return);
              phase 2 walks back in time carrying G_t = dLoss/dh_t = g_t C_t + exp(dt_{t+1} A) G_{t+1}

Per-channel gradients (u, delta, z) are written per position; dA, dD and d(delta_bias) are summed
over positions in registers and over the batch in torch; dB_t, dC_t (sums over channels) are
written as one partial per channel block, (B, blocks, L, N), and summed in torch: no atomics, so
the result is deterministic. Arithmetic is fp32 whatever the input dtype (bf16 inputs are upcast
on load); out has u's dtype and each gradient its input's dtype.

Tensors are read time-major, (B, L, D) and (B, L, N): transposed views of (B, L, X) tensors, which
is what the Mamba block passes, cost no copy; out and the gradients of u, delta, z are (B, D, L)
views of (B, L, D) memory, like `selective_scan`'s. fp64 inputs and return_last_state are left to
the PyTorch scan (see `supports`).

BLOCK_D and the warps per program are autotuned (`CONFIGS`) once per D, N, dtypes and batch and L
rounded up to powers of two; PTM_MAMBA_SCAN_BLOCK=32x2 (say) pins one config instead.

`AVAILABLE` is true when triton imports and CUDA is there. Without triton this module still
imports (the kernels are then plain, never-called functions). The tests also run the kernels on
CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""

import contextlib
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ptm_mamba.errors import PipelineError

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - not installed, or broken: AVAILABLE is False and nothing below ever runs
    from types import SimpleNamespace

    triton = None
    tl = SimpleNamespace(constexpr=None)

AVAILABLE: bool = triton is not None and torch.cuda.is_available()
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _jit(fn=None, **options):
    if triton is None:
        return fn if fn is not None else (lambda f: f)
    return triton.jit(fn, **options)


CONFIGS = ((16, 1), (32, 1), (32, 2), (64, 2), (64, 4))  # (BLOCK_D, num_warps) the autotuner tries
MIN_BLOCK_D = 16  # smallest BLOCK_D allowed: sizes the dB, dC partials before the tuner has picked one


def _pinned_config(configs, named_args, **kwargs):
    """The configs to try: all, or the one PTM_MAMBA_SCAN_BLOCK="BLOCK_DxWARPS" names (e.g. "32x2").

    Read when a (batch, D, L, N, dtypes) key is first tuned; later calls with that key reuse the choice.
    """
    spec = os.environ.get("PTM_MAMBA_SCAN_BLOCK", "").strip()
    if not spec:
        return configs
    try:
        block, warps = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        block = warps = 0
    if block < MIN_BLOCK_D or block & (block - 1) or warps not in (1, 2, 4, 8):
        raise PipelineError(f"PTM_MAMBA_SCAN_BLOCK={spec!r}: want BLOCK_DxWARPS, BLOCK_D a power of two >= 16")
    return [triton.Config({"BLOCK_D": block}, num_warps=warps)]


def _tuned(fn):
    """Autotune BLOCK_D and warps; one config under the interpreter (it is slow).

    Tuned once per (D, N_PAD, dtypes, batch and L rounded up to powers of two): training batches
    vary in shape, and each new key costs a benchmark of every config.
    """
    if triton is None:
        return fn
    configs = [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd, w in (CONFIGS[:1] if INTERPRET else CONFIGS)]
    key = ["dim", "N_PAD", "batch_pow2", "length_pow2"]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _pinned_config})(fn)


_TUNE_ONLY = ["batch_pow2", "length_pow2"]  # kernel arguments that only feed the tuning key




@_jit
def _softplus(x):
    """log(1 + e^x) as max(x, 0) + log1p(e^-|x|), log1p by its series where 1 + e rounds (no libdevice
    in the interpreter); within an ulp or two of torch's softplus (which returns x above 20)."""
    e = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@_jit
def _load_step(
    u_ptr, delta_ptr, B_ptr, C_ptr, bias, x_row, bc_row, offs_d, offs_n, mask_d, mask_n, SOFTPLUS: tl.constexpr
):
    """One position's inputs in fp32: u, raw = delta + bias, dt (softplus(raw) or raw), B_t, C_t.

    x_row: offset of (b, t, 0) in the (B, L, D) tensors; bc_row: of (b, t, 0) in the (B, L, N) ones.
    Masked-off channels read u = 0, so their state stays 0 whatever dt is.
    """
    u = tl.load(u_ptr + x_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    raw = tl.load(delta_ptr + x_row + offs_d, mask=mask_d, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    Bt = tl.load(B_ptr + bc_row + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bc_row + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return u, raw, dt, Bt, Ct


@_jit
def _block_params(
    A_ptr, D_ptr, bias_ptr, dim, nstate,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """This program's channels and the per-channel parameters: A (N_PAD, BLOCK_D), D, bias (BLOCK_D,).

    A comes transposed, (N, D) contiguous, so that all (N_PAD, BLOCK_D) tiles keep one register
    layout: channels across threads, each thread holding its channels' N states.
    """
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_d, mask_n = offs_d < dim, offs_n < nstate
    A = tl.load(A_ptr + offs_n[:, None] * dim + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    Dskip = tl.zeros((BLOCK_D,), tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, offs_n, mask_d, mask_n, A.to(tl.float32), Dskip, bias


@_tuned
@_jit(do_not_specialize=_TUNE_ONLY)
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, length, nstate, batch_pow2, length_pow2,
    N_PAD: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(D, BLOCK_D)); out (B, L, D) in its own dtype."""
    offs_d, offs_n, mask_d, mask_n, A, Dskip, bias = _block_params(
        A_ptr, D_ptr, bias_ptr, dim, nstate, BLOCK_D, N_PAD, HAS_D, HAS_BIAS
    )
    x_base = tl.program_id(0).to(tl.int64) * length * dim
    bc_base = tl.program_id(0).to(tl.int64) * length * nstate
    h = tl.zeros((N_PAD, BLOCK_D), tl.float32)
    u_n, raw_n, dt_n, B_n, C_n = _load_step(
        u_ptr, delta_ptr, B_ptr, C_ptr, bias, x_base, bc_base, offs_d, offs_n, mask_d, mask_n, SOFTPLUS
    )
    z_n = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_Z:
        z_n = tl.load(z_ptr + x_base + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for t in range(length):
        u, dt, Bt, Ct, z = u_n, dt_n, B_n, C_n, z_n
        x_row, more = x_base + t * dim, t + 1 < length  # prefetch position t + 1
        u_n, raw_n, dt_n, B_n, C_n = _load_step(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias, x_row + dim, bc_base + (t + 1) * nstate,
            offs_d, offs_n, mask_d & more, mask_n & more, SOFTPLUS,
        )  # fmt: skip
        if HAS_Z:
            z_n = tl.load(z_ptr + x_row + dim + offs_d, mask=mask_d & more, other=0.0).to(tl.float32)
        h = tl.exp(dt[None, :] * A) * h + (dt * u)[None, :] * Bt[:, None]
        y = tl.sum(h * Ct[:, None], axis=0) + Dskip * u
        if HAS_Z:
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + x_row + offs_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


@_tuned
@_jit(do_not_specialize=_TUNE_ONLY)
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, h_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    dim, length, nstate, nblocks, batch_pow2, length_pow2,
    N_PAD: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(D, BLOCK_D)).

    h: (B, L, N_PAD, D) fp32 scratch. Writes du, ddelta, dz (B, L, D) in their dtypes and fp32
    partials dA (B, N_PAD, D), dD and dbias (B, D), dB and dC (B, nblocks, L, N_PAD).
    """
    offs_d, offs_n, mask_d, mask_n, A, Dskip, bias = _block_params(
        A_ptr, D_ptr, bias_ptr, dim, nstate, BLOCK_D, N_PAD, HAS_D, HAS_BIAS
    )
    pid_b = tl.program_id(0).to(tl.int64)
    x_base = pid_b * length * dim
    bc_base = pid_b * length * nstate
    h_tile = offs_n[:, None] * dim + offs_d[None, :]  # (b, t, n, d) sits at (b * L + t) * N_PAD * D + h_tile
    h_mask = mask_n[:, None] & mask_d[None, :]
    h_step = dim * N_PAD  # scratch offset from one position to the next
    part_base = (pid_b * nblocks + tl.program_id(1)) * length * N_PAD  # this block's (L, N_PAD) dB, dC partials

    # Phase 1: the states, exactly as the forward kernel computes them, into the scratch.
    h = tl.zeros((N_PAD, BLOCK_D), tl.float32)
    u_n, raw_n, dt_n, B_n, C_n = _load_step(
        u_ptr, delta_ptr, B_ptr, C_ptr, bias, x_base, bc_base, offs_d, offs_n, mask_d, mask_n, SOFTPLUS
    )
    for t in range(length):
        u, dt, Bt = u_n, dt_n, B_n
        more = t + 1 < length
        u_n, raw_n, dt_n, B_n, C_n = _load_step(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias, x_base + (t + 1) * dim, bc_base + (t + 1) * nstate,
            offs_d, offs_n, mask_d & more, mask_n & more, SOFTPLUS,
        )  # fmt: skip
        h = tl.exp(dt[None, :] * A) * h + (dt * u)[None, :] * Bt[:, None]
        tl.store(h_ptr + (pid_b * length + t) * h_step + h_tile, h, mask=h_mask)
    tl.debug_barrier()  # each thread reads back what it wrote (same layout); the barrier makes that certain

    # Phase 2: backwards in time. G carries dLoss/dh_t, dA_next = exp(dt_{t+1} A), h the state h_t.
    G = tl.zeros((N_PAD, BLOCK_D), tl.float32)
    dA_next = tl.zeros((N_PAD, BLOCK_D), tl.float32)
    grad_A = tl.zeros((N_PAD, BLOCK_D), tl.float32)
    grad_D = tl.zeros((BLOCK_D,), tl.float32)
    grad_bias = tl.zeros((BLOCK_D,), tl.float32)
    last = length - 1
    u_n, raw_n, dt_n, B_n, C_n = _load_step(
        u_ptr, delta_ptr, B_ptr, C_ptr, bias, x_base + last * dim, bc_base + last * nstate,
        offs_d, offs_n, mask_d, mask_n, SOFTPLUS,
    )  # fmt: skip
    z_n = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_Z:
        z_n = tl.load(z_ptr + x_base + last * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dout_n = tl.load(dout_ptr + x_base + last * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    hprev_n = tl.load(h_ptr + (pid_b * length + last - 1) * h_step + h_tile, mask=h_mask & (last > 0), other=0.0)
    for i in range(length):
        t = last - i
        u, raw, dt, Bt, Ct, z, dout, h_prev = u_n, raw_n, dt_n, B_n, C_n, z_n, dout_n, hprev_n
        x_row, more = x_base + t * dim, t > 0  # prefetch position t - 1 and the state before it
        u_n, raw_n, dt_n, B_n, C_n = _load_step(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias, x_row - dim, bc_base + (t - 1) * nstate,
            offs_d, offs_n, mask_d & more, mask_n & more, SOFTPLUS,
        )  # fmt: skip
        if HAS_Z:
            z_n = tl.load(z_ptr + x_row - dim + offs_d, mask=mask_d & more, other=0.0).to(tl.float32)
        dout_n = tl.load(dout_ptr + x_row - dim + offs_d, mask=mask_d & more, other=0.0).to(tl.float32)
        hprev_n = tl.load(h_ptr + (pid_b * length + t - 2) * h_step + h_tile, mask=h_mask & (t > 1), other=0.0)

        g = dout  # dLoss/dy_t, y_t = C_t . h_t + D u_t before the gate
        if HAS_Z:
            sig = tl.sigmoid(z)
            y = tl.sum(h * Ct[:, None], axis=0) + Dskip * u
            grad_z = dout * y * sig * (1 + z * (1 - sig))  # silu'(z) = sig (1 + z (1 - sig))
            tl.store(dz_ptr + x_row + offs_d, grad_z.to(dz_ptr.dtype.element_ty), mask=mask_d)
            g = dout * z * sig
        grad_D += g * u
        tl.store(dC_ptr + part_base + t * N_PAD + offs_n, tl.sum(h * g[None, :], axis=1))
        dA = tl.exp(dt[None, :] * A)
        G = dA_next * G + g[None, :] * Ct[:, None]
        tl.store(dB_ptr + part_base + t * N_PAD + offs_n, tl.sum(G * (dt * u)[None, :], axis=1))
        GB = tl.sum(G * Bt[:, None], axis=0)
        tl.store(du_ptr + x_row + offs_d, (dt * GB + g * Dskip).to(du_ptr.dtype.element_ty), mask=mask_d)
        Q = G * dA * h_prev  # dLoss/d(dt_t A)
        grad_A += Q * dt[None, :]
        grad_dt = u * GB + tl.sum(Q * A, axis=0)
        if SOFTPLUS:
            grad_dt = grad_dt * tl.sigmoid(raw)
        grad_bias += grad_dt
        tl.store(ddelta_ptr + x_row + offs_d, grad_dt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
        dA_next, h = dA, h_prev

    tl.store(dA_ptr + pid_b * N_PAD * dim + h_tile, grad_A, mask=h_mask)
    tl.store(dD_ptr + pid_b * dim + offs_d, grad_D, mask=mask_d)
    tl.store(dbias_ptr + pid_b * dim + offs_d, grad_bias, mask=mask_d)


def supports(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *optional: Tensor | None) -> bool:
    """Whether the kernels handle these inputs: real fp32/bf16/fp16 tensors on one CUDA device, L > 0."""
    tensors = [t for t in (u, delta, A, B, C, *optional) if t is not None]
    ok_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    same_gpu = all(t.is_cuda and t.dtype in ok_dtypes for t in tensors) and len({t.device for t in tensors}) == 1
    return same_gpu and u.numel() > 0


def _time_major(x: Tensor) -> Tensor:
    """(B, X, L) -> contiguous (B, L, X); free when x is a transposed view of a (B, L, X) tensor."""
    return x.transpose(1, 2).contiguous()


def _flags(A: Tensor, D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> dict:
    """The kernels' compile-time switches; N is padded to a power of two (tl.arange needs one)."""
    n_pad = max(triton.next_power_of_2(A.shape[1]), 2)
    return dict(
        N_PAD=n_pad, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus
    )


def _launch(kernel, batch: int, dim: int, length: int, *args: Tensor | int, **flags) -> None:
    """kernel(*args, batch_pow2, length_pow2, **flags) over the grid (B, cdiv(D, BLOCK_D)), on args[0]'s GPU."""
    grid = lambda meta: (batch, triton.cdiv(dim, meta["BLOCK_D"]))  # noqa: E731
    with torch.cuda.device(args[0].device) if args[0].is_cuda else contextlib.nullcontext():
        kernel[grid](*args, triton.next_power_of_2(batch), triton.next_power_of_2(length), **flags)


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias) -> list[Tensor]:
    """Both kernels' first eight arguments: u, delta (B, L, D); A (N, D); B, C (B, L, N); D; z (B, L, D);
    delta_bias. An absent D, z or delta_bias is stood in for by u: the kernels never read it."""
    ut = _time_major(u)
    return [
        ut, _time_major(delta), A.t().contiguous(), _time_major(B), _time_major(C),
        ut if D is None else D.contiguous(), ut if z is None else _time_major(z),
        ut if delta_bias is None else delta_bias.contiguous(),
    ]  # fmt: skip


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, length = u.shape
        args = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias)
        out = torch.empty_like(args[0])  # (B, L, D) in u's dtype
        flags = _flags(A, D, z, delta_bias, delta_softplus)
        _launch(_fwd_kernel, batch, dim, length, *args, out, dim, length, A.shape[1], **flags)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        batch, dim, length = u.shape
        nstate = A.shape[1]
        flags = _flags(A, D, z, delta_bias, ctx.delta_softplus)
        n_pad = flags["N_PAD"]
        args = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias)
        ut, deltat, zt = args[0], args[1], args[6]
        f32 = dict(dtype=torch.float32, device=u.device)
        max_blocks = triton.cdiv(dim, MIN_BLOCK_D)
        h = torch.empty(batch, length, n_pad, dim, **f32)
        du, ddelta = torch.empty_like(ut), torch.empty_like(deltat)
        dz = torch.empty_like(zt) if z is not None else du
        dA = torch.empty(batch, n_pad, dim, **f32)
        dD, dbias = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        dB = torch.empty(batch, max_blocks, length, n_pad, **f32)
        dC = torch.empty(batch, max_blocks, length, n_pad, **f32)
        _launch(
            _bwd_kernel, batch, dim, length,
            *args, _time_major(grad_out), h, du, ddelta, dz, dA, dD, dbias, dB, dC, dim, length, nstate, max_blocks,
            **flags,
        )  # fmt: skip
        del h
        blocks = triton.cdiv(dim, _bwd_kernel.best_config.kwargs["BLOCK_D"])  # rows the chosen config wrote

        def reduce_bc(part: Tensor, like: Tensor) -> Tensor:  # (B, blocks, L, N_PAD) -> (B, N, L) view
            return part[:, :blocks, :, :nstate].sum(1).to(like.dtype).transpose(1, 2)

        return (
            du.transpose(1, 2),
            ddelta.transpose(1, 2),
            dA.sum(0)[:nstate].t().to(A.dtype),
            reduce_bc(dB, B),
            reduce_bc(dC, C),
            dD.sum(0).to(D.dtype) if D is not None else None,
            dz.transpose(1, 2) if z is not None else None,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            None,
        )


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """`selective_scan` (without return_last_state) on the Triton kernels. Shapes are checked by the caller."""
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
