"""Mamba's selective scan as Triton kernels: the fast path of `ptm_mamba.scan.selective_scan` on CUDA.

One program owns one batch row and BLOCK_D channels and walks the sequence in chunks of CHUNK
positions; within a chunk, for each state n, h_t = a_t h_{t-1} + b_t is solved at once by
`tl.associative_scan` over affine maps. Sequential work is L / CHUNK steps, not L: a kernel that
stepped position by position was latency-bound (same 5.8 ms on an H100 at batch 1 and 16).
The forward keeps the state entering each chunk, (B, chunks, N_PAD, D) fp32, for the backward,
which recomputes h and runs the adjoint scan over the chunks in reverse.

dB and dC are written as one partial per channel block and summed in torch: no atomics, so the
result is deterministic. Arithmetic is fp32; outputs take their inputs' dtypes. fp64 and
return_last_state are left to the PyTorch scan (`supports`). Without triton this module still
imports; the tests run the kernels on CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""

import contextlib
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ptm_mamba.errors import one_line

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - not installed, or broken: unavailable() says so, nothing below runs
    from types import SimpleNamespace

    triton = None
    tl = SimpleNamespace(constexpr=None)
    _IMPORT_ERROR = exc

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def broken() -> str | None:
    """Why an installed triton does not import, or None (imports, or not installed)."""
    if _IMPORT_ERROR is None or (isinstance(_IMPORT_ERROR, ModuleNotFoundError) and _IMPORT_ERROR.name == "triton"):
        return None
    return one_line(_IMPORT_ERROR)


def unavailable() -> str | None:
    """Why the kernels cannot run in this process, or None: they need triton, and a CUDA GPU or the interpreter."""
    if triton is None:
        return f"triton does not import: {one_line(_IMPORT_ERROR)}"
    if not (INTERPRET or torch.cuda.is_available()):
        return "no CUDA GPU"
    return None


def _jit(fn=None, **options):
    if triton is None:
        return fn if fn is not None else (lambda f: f)
    return triton.jit(fn, **options)


CONFIGS = ((16, 2), (16, 4), (32, 4), (32, 8), (64, 8))  # (BLOCK_D, num_warps) the autotuner tries
MIN_BLOCK_D = 16  # smallest BLOCK_D allowed: sizes the dB, dC partials before the tuner has picked one
DEFAULT_CHUNK = 32  # positions per chunk: the scan's parallel width; L / CHUNK steps run in sequence
_TUNING: dict = {"chunk": DEFAULT_CHUNK, "config": None}  # set by `configure`


def configure(chunk: int = DEFAULT_CHUNK, block: str | None = None) -> None:
    """For benchmarks: CHUNK for later forwards, and one "BLOCK_DxWARPS" config (e.g. "32x4") in
    place of autotuning for keys not tuned yet; no arguments: the defaults."""
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"chunk {chunk}: want a power of two >= 2")
    config = None
    if block is not None:
        try:
            block_d, warps = (int(x) for x in block.lower().split("x"))
        except ValueError:
            block_d = warps = 0
        if block_d < MIN_BLOCK_D or block_d & (block_d - 1) or warps not in (1, 2, 4, 8):
            raise ValueError(f"block {block!r}: want BLOCK_DxWARPS, BLOCK_D a power of two >= {MIN_BLOCK_D}")
        config = triton.Config({"BLOCK_D": block_d}, num_warps=warps)
    _TUNING.update(chunk=chunk, config=config)


def _pinned_config(configs, named_args, **kwargs):
    return configs if _TUNING["config"] is None else [_TUNING["config"]]


def _tuned(fn):
    """Autotune BLOCK_D and warps (one config under the slow interpreter); batch and L are rounded
    up to powers of two, as each new key costs a benchmark of every config."""
    if triton is None:
        return fn
    configs = [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd, w in (CONFIGS[:1] if INTERPRET else CONFIGS)]
    key = ["dim", "NSTATE", "CHUNK", "batch_pow2", "length_pow2"]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _pinned_config})(fn)


_TUNE_ONLY = ["batch_pow2", "length_pow2"]  # kernel arguments that only feed the tuning key




@_jit
def _softplus(x):
    """log(1 + e^x) as max(x, 0) + log1p(e^-|x|), log1p by its series where 1 + e rounds (no libdevice
    in the interpreter); within an ulp or two of torch's softplus (which returns x above 20)."""
    e = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@_jit
def _affine(a1, b1, a2, b2):
    """Compose x -> a1 x + b1, then x -> a2 x + b2: the scan operator of h_t = a_t h_{t-1} + b_t."""
    return a1 * a2, a2 * b1 + b2


@_jit
def _scan(a, b, h0, offs_t):
    """All h_t = a_t h_{t-1} + b_t of a (CHUNK, BLOCK_D) chunk entered with the state h0 (BLOCK_D,)."""
    b = b + tl.where((offs_t == 0)[:, None], a * h0[None, :], 0.0)
    _, h = tl.associative_scan((a, b), 0, _affine)
    return h


@_jit
def _scan_back(a, b, h0, offs_t, CHUNK: tl.constexpr):
    """All h_t = a_t h_{t+1} + b_t of a chunk, last row first. Rows are reversed and scanned
    forward: associative_scan's reverse=True is reported to misorder non-commutative operators
    (triton-lang/triton#4362)."""
    flip = tl.zeros_like(a).to(tl.int32) + (CHUNK - 1 - offs_t)[:, None]
    return tl.gather(_scan(tl.gather(a, flip, 0), tl.gather(b, flip, 0), h0, offs_t), flip, 0)


@_jit
def _row(tile, offs, i):
    return tl.sum(tl.where(offs[:, None] == i, tile, 0.0), axis=0)


@_jit
def _set_row(tile, offs, i, row):
    return tl.where(offs[:, None] == i, row[None, :], tile)


@_jit
def _chunk_tiles(pid_b, c, offs_t, offs_d, mask_d, length, dim, CHUNK: tl.constexpr):
    """Chunk c's positions, and its tiles' offsets and mask in the (B, L, D) tensors."""
    rows = c * CHUNK + offs_t
    mask_t = rows < length
    offs = (pid_b * length + rows)[:, None] * dim + offs_d[None, :]
    return rows, mask_t, offs, mask_t[:, None] & mask_d[None, :]


@_jit
def _raw_tile(delta_ptr, bias, offs, mask):
    return tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]


@_jit
def _dt_tile(delta_ptr, bias, offs, mask, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias) (or delta + bias) as an fp32 tile; 0 where masked off, so positions
    past the end leave the state as it is (a = 1, b = 0)."""
    dt = _raw_tile(delta_ptr, bias, offs, mask)
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask, dt, 0.0)


@_jit
def _gated_grad(dout_ptr, z_ptr, offs, mask, HAS_Z: tl.constexpr):
    """dLoss/dy_t for y_t = C_t . h_t + D u_t before the gate: dout, times silu(z) when gated."""
    g = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = g * z * tl.sigmoid(z)
    return g


@_jit
def _state_inputs(A_ptr, B_ptr, C_ptr, n, dim, bc_offs, offs_d, mask_t, mask_d, NSTATE: tl.constexpr):
    """State n's parameters: A[:, n] (BLOCK_D,) and the chunk's B[:, n], C[:, n] (CHUNK,), fp32."""
    A_n = tl.load(A_ptr + n * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    B_n = tl.load(B_ptr + bc_offs * NSTATE + n, mask=mask_t, other=0.0).to(tl.float32)
    C_n = tl.load(C_ptr + bc_offs * NSTATE + n, mask=mask_t, other=0.0).to(tl.float32)
    return A_n, B_n, C_n


@_jit
def _program_tiles(D_ptr, bias_ptr, dim, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, N_PAD: tl.constexpr,
                   HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    Dskip = tl.zeros((BLOCK_D,), tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, mask_d, tl.arange(0, CHUNK), tl.arange(0, N_PAD), Dskip, bias


@_tuned
@_jit(do_not_specialize=_TUNE_ONLY)
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
    dim, length, nchunks, batch_pow2, length_pow2,
    NSTATE: tl.constexpr, N_PAD: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(D, BLOCK_D)); out (B, L, D) in its own dtype; states (B, chunks, N_PAD, D) fp32."""
    offs_d, mask_d, offs_t, offs_n, Dskip, bias = _program_tiles(
        D_ptr, bias_ptr, dim, BLOCK_D, CHUNK, N_PAD, HAS_D, HAS_BIAS
    )
    pid_b = tl.program_id(0).to(tl.int64)
    state_tile = offs_n[:, None] * dim + offs_d[None, :]
    state_mask = (offs_n < NSTATE)[:, None] & mask_d[None, :]
    h = tl.zeros((N_PAD, BLOCK_D), tl.float32)  # the state entering the chunk, all N of it
    for c in range(nchunks):
        rows, mask_t, offs, mask = _chunk_tiles(pid_b, c, offs_t, offs_d, mask_d, length, dim, CHUNK)
        if STORE_STATES:
            tl.store(states_ptr + (pid_b * nchunks + c) * N_PAD * dim + state_tile, h, mask=state_mask)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dt = _dt_tile(delta_ptr, bias, offs, mask, SOFTPLUS)
        dtu = dt * u
        y = Dskip[None, :] * u
        bc_offs = pid_b * length + rows
        A_next, B_next, C_next = _state_inputs(A_ptr, B_ptr, C_ptr, 0, dim, bc_offs, offs_d, mask_t, mask_d, NSTATE)
        for n in range(NSTATE):
            A_n, B_n, C_n = A_next, B_next, C_next  # and load state n + 1's while this one computes
            A_next, B_next, C_next = _state_inputs(
                A_ptr, B_ptr, C_ptr, tl.minimum(n + 1, NSTATE - 1), dim, bc_offs, offs_d, mask_t, mask_d, NSTATE
            )
            hs = _scan(tl.exp(dt * A_n[None, :]), dtu * B_n[:, None], _row(h, offs_n, n), offs_t)
            y += hs * C_n[:, None]
            h = _set_row(h, offs_n, n, _row(hs, offs_t, CHUNK - 1))
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@_tuned
@_jit(do_not_specialize=_TUNE_ONLY)
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    dim, length, nchunks, nblocks, batch_pow2, length_pow2,
    NSTATE: tl.constexpr, N_PAD: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(D, BLOCK_D)); states from the forward. Writes du, ddelta, dz (B, L, D) and fp32
    partials dA (B, N_PAD, D), dD and dbias (B, D), dB and dC (B, nblocks, L, N_PAD)."""
    offs_d, mask_d, offs_t, offs_n, Dskip, bias = _program_tiles(
        D_ptr, bias_ptr, dim, BLOCK_D, CHUNK, N_PAD, HAS_D, HAS_BIAS
    )
    pid_b = tl.program_id(0).to(tl.int64)
    part_base = (pid_b * nblocks + tl.program_id(1)) * length * N_PAD  # this block's (L, N_PAD) dB, dC partials
    G = tl.zeros((N_PAD, BLOCK_D), tl.float32)  # dLoss/dh at the first position of the chunk after this one
    grad_A = tl.zeros((N_PAD, BLOCK_D), tl.float32)
    grad_D = tl.zeros((BLOCK_D,), tl.float32)
    grad_bias = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        rows, mask_t, offs, mask = _chunk_tiles(pid_b, c, offs_t, offs_d, mask_d, length, dim, CHUNK)
        # Keep registers for the state loop: u, z, dout and delta are re-read after it (cache hits).
        dt = _dt_tile(delta_ptr, bias, offs, mask, SOFTPLUS)
        dt_next = _dt_tile(delta_ptr, bias, offs + dim, (rows + 1 < length)[:, None] & mask_d[None, :], SOFTPLUS)
        dtu = dt * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _gated_grad(dout_ptr, z_ptr, offs, mask, HAS_Z)
        y = tl.zeros((CHUNK, BLOCK_D), tl.float32)  # C_t . h_t, summed over the states
        GB = tl.zeros((CHUNK, BLOCK_D), tl.float32)  # sum over n of G_t B_t[n]
        QA = tl.zeros((CHUNK, BLOCK_D), tl.float32)  # sum over n of dLoss/d(dt_t A_n) A_n
        state_base = states_ptr + (pid_b * nchunks + c) * N_PAD * dim
        bc_offs = pid_b * length + rows
        A_next, B_next, C_next = _state_inputs(A_ptr, B_ptr, C_ptr, 0, dim, bc_offs, offs_d, mask_t, mask_d, NSTATE)
        for n in range(NSTATE):
            A_n, B_n, C_n = A_next, B_next, C_next
            A_next, B_next, C_next = _state_inputs(
                A_ptr, B_ptr, C_ptr, tl.minimum(n + 1, NSTATE - 1), dim, bc_offs, offs_d, mask_t, mask_d, NSTATE
            )
            a = tl.exp(dt * A_n[None, :])
            b = dtu * B_n[:, None]
            hs = _scan(a, b, tl.load(state_base + n * dim + offs_d, mask=mask_d, other=0.0), offs_t)
            y += hs * C_n[:, None]
            tl.store(dC_ptr + part_base + rows * N_PAD + n, tl.sum(hs * g, axis=1), mask=mask_t)
            Gs = _scan_back(tl.exp(dt_next * A_n[None, :]), g * C_n[:, None], _row(G, offs_n, n), offs_t, CHUNK)
            G = _set_row(G, offs_n, n, _row(Gs, offs_t, 0))
            tl.store(dB_ptr + part_base + rows * N_PAD + n, tl.sum(Gs * dtu, axis=1), mask=mask_t)
            GB += Gs * B_n[:, None]
            Q = Gs * (hs - b)  # G_t a_t h_{t-1} = dLoss/d(dt_t A_n)
            QA += Q * A_n[None, :]
            grad_A += tl.where(offs_n[:, None] == n, tl.sum(Q * dt, axis=0)[None, :], 0.0)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            y += Dskip[None, :] * u
            grad_z = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32) * y * sig * (1 + z * (1 - sig))
            tl.store(dz_ptr + offs, grad_z.to(dz_ptr.dtype.element_ty), mask=mask)  # silu'(z) = sig (1 + z (1 - sig))
        grad_D += tl.sum(g * u, axis=0)
        tl.store(du_ptr + offs, (dt * GB + g * Dskip[None, :]).to(du_ptr.dtype.element_ty), mask=mask)
        grad_dt = u * GB + QA
        if SOFTPLUS:
            grad_dt = grad_dt * tl.sigmoid(_raw_tile(delta_ptr, bias, offs, mask))
        grad_dt = tl.where(mask, grad_dt, 0.0)
        grad_bias += tl.sum(grad_dt, axis=0)
        tl.store(ddelta_ptr + offs, grad_dt.to(ddelta_ptr.dtype.element_ty), mask=mask)

    part_tile = offs_n[:, None] * dim + offs_d[None, :]
    tl.store(dA_ptr + pid_b * N_PAD * dim + part_tile, grad_A, mask=(offs_n < NSTATE)[:, None] & mask_d[None, :])
    tl.store(dD_ptr + pid_b * dim + offs_d, grad_D, mask=mask_d)
    tl.store(dbias_ptr + pid_b * dim + offs_d, grad_bias, mask=mask_d)


def supports(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *optional: Tensor | None) -> bool:
    """Whether the kernels take these inputs: real fp32/bf16/fp16 tensors on one CUDA device (or on the
    CPU under the interpreter), L > 0."""
    tensors = [t for t in (u, delta, A, B, C, *optional) if t is not None]
    ok_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    runs_there = triton is not None and (u.is_cuda or (INTERPRET and u.device.type == "cpu"))
    same_device = all(t.dtype in ok_dtypes and t.device == u.device for t in tensors)
    return runs_there and same_device and u.numel() > 0


def _time_major(x: Tensor) -> Tensor:
    return x.transpose(1, 2).contiguous()


def _flags(A: Tensor, D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> dict:
    """The kernels' compile-time switches; state tiles are N padded to a power of two (tl.arange needs one)."""
    return dict(
        NSTATE=A.shape[1], N_PAD=max(triton.next_power_of_2(A.shape[1]), 2),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
    )  # fmt: skip


def _launch(kernel, batch: int, dim: int, length: int, *args: Tensor | int, **flags) -> None:
    """kernel(*args, batch_pow2, length_pow2, **flags) over the grid (B, cdiv(D, BLOCK_D)), on args[0]'s GPU."""
    grid = lambda meta: (batch, triton.cdiv(dim, meta["BLOCK_D"]))  # noqa: E731
    with torch.cuda.device(args[0].device) if args[0].is_cuda else contextlib.nullcontext():
        kernel[grid](*args, triton.next_power_of_2(batch), triton.next_power_of_2(length), **flags)


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias) -> list[Tensor]:
    """Both kernels' first eight arguments; an absent D, z or delta_bias is stood in for by u (never read)."""
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
        chunk = _TUNING["chunk"]
        nchunks = triton.cdiv(length, chunk)
        keep = any(ctx.needs_input_grad)  # the states entering each chunk, for the backward
        states = torch.empty(batch, nchunks, flags["N_PAD"], dim, dtype=torch.float32, device=u.device) if keep else u
        _launch(
            _fwd_kernel, batch, dim, length, *args, out, states, dim, length, nchunks,
            STORE_STATES=keep, CHUNK=chunk, **flags,
        )  # fmt: skip
        if keep:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        batch, dim, length = u.shape
        nstate, nchunks = A.shape[1], states.shape[1]
        flags = _flags(A, D, z, delta_bias, ctx.delta_softplus)
        args = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias)
        ut, deltat, zt = args[0], args[1], args[6]
        f32 = dict(dtype=torch.float32, device=u.device)
        max_blocks = triton.cdiv(dim, MIN_BLOCK_D)
        n_pad = flags["N_PAD"]
        du, ddelta = torch.empty_like(ut), torch.empty_like(deltat)
        dz = torch.empty_like(zt) if z is not None else du
        dA = torch.empty(batch, n_pad, dim, **f32)
        dD, dbias = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
        dB = torch.empty(batch, max_blocks, length, n_pad, **f32)
        dC = torch.empty(batch, max_blocks, length, n_pad, **f32)
        _launch(
            _bwd_kernel, batch, dim, length,
            *args, _time_major(grad_out), states, du, ddelta, dz, dA, dD, dbias, dB, dC,
            dim, length, nchunks, max_blocks, CHUNK=ctx.chunk, **flags,
        )  # fmt: skip
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
