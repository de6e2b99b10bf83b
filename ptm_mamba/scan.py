"""Mamba's selective scan (the S6 recurrence) in plain PyTorch, fast enough to train on a CPU.

For every batch b, channel d and state n (u, delta: (B, D, L); A: (D, N); B, C: (B, N, L)):

    delta_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,    h_{-1} = 0
    out_t   = sum_n C_t h_t + D * u_t,    then  out_t * silu(z_t)  when z is given

The recurrence runs as an in-place Blelloch scan over time (2*log2(L) rounds of whole-tensor
ops), never a Python loop over positions. It only multiplies the decays exp(delta*A), with no
division, so with delta >= 0 and A < 0 every factor is <= 1 and nothing can overflow. The
hand-written backward saves only the inputs and recomputes the states: memory stays at three
(B, L, N, D) tensors, never (B, D, L, L). Internally time-major, so each scan step touches
contiguous N*D blocks; arithmetic in fp32 (fp64 for fp64 inputs), output in u's dtype.

`scan=` may run the Triton kernels of `ptm_mamba.scan_triton` instead, once they pass
`triton_agrees` on the device; any failure warns once and stays on PyTorch (`ptm_mamba.kernels`).
"""

from __future__ import annotations

import math
import threading
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ptm_mamba import scan_triton
from ptm_mamba.kernels import fall_back, falling_back, has_failed, note_passed_check, note_ran, passed_check


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (half-precision inputs are computed in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    batch, dim, length = u.shape
    if A.is_complex() or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be real with shape (D, N) = ({dim}, N), got {tuple(A.shape)} {A.dtype}")
    want = (batch, A.shape[1], length)
    if delta.shape != u.shape or B.shape != want or C.shape != want:
        raise ValueError(
            f"expected delta {tuple(u.shape)} and B, C {want}; got delta {tuple(delta.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)} (only per-position B, C without groups are supported)"
        )


def _rounds(length: int) -> Iterator[tuple[int, int]]:
    """(first target index, stride s) of each Blelloch round: round (first, s) updates j = first,
    first + 2s, ... from j - s; up-sweep first = 2s-1, then down-sweep first = 3s-1, largest s first."""
    s = 1
    while 2 * s <= length:
        yield 2 * s - 1, s
        s *= 2
    s //= 2
    while s >= 1:
        yield 3 * s - 1, s
        s //= 2


def _scan_(a: Tensor, b: Tensor, reverse: bool = False) -> Tensor:
    """In-place linear recurrence over dim 1, as a work-efficient parallel (Blelloch) scan.

    Forward:  b[:, t] <- a[:, t] * b[:, t-1] + b[:, t]   (b[:, -1] = 0)
    reverse:  b[:, t] <- a[:, t] * b[:, t+1] + b[:, t]   (b[:, L] = 0)
    a, b: (B, L, ...) of one shape, any L. Returns b, holding the states; a is clobbered.
    """
    length = a.shape[1]
    rounds = [(first, s) for first, s in _rounds(length) if first < length]
    for i, (first, s) in enumerate(rounds):
        n = len(range(first, length, 2 * s))
        if reverse:  # mirror j -> length-1-j: targets ascend to length-1-first, sources sit s later
            lo = (length - 1 - first) % (2 * s)
            dst, src = slice(lo, lo + 2 * s * n, 2 * s), slice(lo + s, lo + s + 2 * s * n, 2 * s)
        else:
            dst, src = slice(first, first + 2 * s * n, 2 * s), slice(first - s, first - s + 2 * s * n, 2 * s)
        a_dst, b_dst = a[:, dst], b[:, dst]
        b_dst.addcmul_(a_dst, b[:, src])  # compose: (a_d, b_d) o (a_s, b_s) = (a_d a_s, a_d b_s + b_d)
        if i < len(rounds) - 1:  # the last round's decay products are never read
            a_dst.mul_(a[:, src])
    return b


class _Workspace(threading.local):
    """Reused CPU scratch buffers ("slots", one live tensor each, never returned to the caller):
    a fresh 100 MB CPU tensor costs more in page faults than its arithmetic. Elsewhere the caching
    allocator does this already."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def get(self, slot: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        numel = math.prod(shape)
        key = (slot, like.device, like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(key, None)  # free the old one before allocating the larger one
            buf = self.buffers[key] = torch.empty(numel, dtype=like.dtype)
        return buf[:numel].view(shape)


_workspace = _Workspace()


def release_workspace() -> None:
    """Free the CPU scratch memory that `selective_scan` keeps between calls (this thread's)."""
    _workspace.buffers.clear()


class _Inputs(NamedTuple):

    u: Tensor  # (B, L, D)
    raw: Tensor  # (B, L, D) delta + delta_bias, before softplus
    dt: Tensor  # (B, L, D) the step size actually used
    A: Tensor  # (N, D)
    B: Tensor  # (B, L, N)
    C: Tensor  # (B, L, N)

    def state_shape(self) -> tuple[int, int, int, int]:
        batch, length, dim = self.u.shape
        return batch, length, self.A.shape[0], dim


def _time_major(x: Tensor, f: torch.dtype) -> Tensor:
    return x.transpose(1, 2).to(f).contiguous()


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus: bool, f: torch.dtype) -> _Inputs:
    raw = _time_major(delta, f)
    if delta_bias is not None:
        raw = raw + delta_bias.to(f)
    dt = F.softplus(raw) if delta_softplus else raw
    return _Inputs(_time_major(u, f), raw, dt, A.to(f).t().contiguous(), _time_major(B, f), _time_major(C, f))


def _decay(dt: Tensor, A: Tensor, out: Tensor) -> Tensor:
    """out <- exp(dt_t * A): (B, L, D) x (N, D) -> (B, L, N, D)."""
    return torch.mul(dt[:, :, None, :], A, out=out).exp_()


def _drive(x: _Inputs, out: Tensor) -> Tensor:
    """out <- dt_t * B_t * u_t, (B, L, N, D)."""
    return torch.mul((x.dt * x.u)[:, :, None, :], x.B[..., None], out=out)


def _states(x: _Inputs) -> Tensor:
    """All states h in workspace slot 1 (slot 0 is used up): (B, L, N, D)."""
    shape = x.state_shape()
    decay = _decay(x.dt, x.A, _workspace.get(0, shape, x.u))
    return _scan_(decay, _drive(x, _workspace.get(1, shape, x.u)))


def _read_out(h: Tensor, x: _Inputs, D: Tensor | None) -> Tensor:
    """y_t = sum_n C_t h_t (+ D u_t): (B, L, D)."""
    y = torch.matmul(x.C[:, :, None, :], h).squeeze(2)
    return y if D is None else y + x.u * D.to(y.dtype)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        f = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        x = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, f)
        h = _states(x)
        out = _read_out(h, x, D)
        if z is not None:
            out = out * F.silu(_time_major(z, f))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus, ctx.f = delta_softplus, f
        out = out.transpose(1, 2).to(u.dtype)  # (B, D, L) view of time-major memory, as the block wants it
        if not return_last_state:
            return out
        last_state = h[:, -1].transpose(1, 2).contiguous()  # (B, D, N), compute dtype like mamba-ssm's
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_ignored_last_state_grad):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        f = ctx.f
        x = _prepare(u, delta, A, B, C, delta_bias, ctx.delta_softplus, f)
        shape = x.state_shape()
        # The adjoint recurrence needs the decay one step ahead: a_t = exp(dt_{t+1} A) (a_{L-1} unused).
        ahead = _workspace.get(2, shape, x.u)
        ahead[:, -1].zero_()
        _decay(x.dt[:, 1:], x.A, ahead[:, :-1])
        h = _states(x)  # recomputed rather than saved: (B, L, N, D) is the big tensor; slot 0 now free
        g = _time_major(grad_out, f)  # dLoss/dout, (B, L, D)

        grad_z = None
        if z is not None:
            zt = _time_major(z, f)
            sig = torch.sigmoid(zt)
            grad_z = g * _read_out(h, x, D) * sig * (1 + zt * (1 - sig))  # silu'(z) = sig (1 + z (1 - sig))
            g = g * zt * sig
        grad_D = (g * x.u).sum((0, 1)) if D is not None else None
        grad_C = torch.matmul(h, g[..., None]).squeeze(-1)  # (B, L, N)

        # Adjoint G_t = dLoss/dh_t = C_t g_t + exp(dt_{t+1} A) G_{t+1}: a scan backwards in time.
        seed = torch.mul(x.C[..., None], g[:, :, None, :], out=_workspace.get(0, shape, x.u))
        G = _scan_(ahead, seed, reverse=True)  # slot 0; slot 2 now free

        # h_t = dA_t h_{t-1} + dt_t B_t u_t: dLoss/d(dt_t B_t u_t) = G_t, dLoss/d(dA_t) = G_t h_{t-1}.
        GB = torch.matmul(x.B[:, :, None, :], G).squeeze(2)  # sum_n G_t B_t, (B, L, D)
        grad_B = torch.matmul(G, (x.dt * x.u)[..., None]).squeeze(-1)  # (B, L, N)
        grad_u = x.dt * GB if D is None else x.dt * GB + g * D.to(f)
        Q = _decay(x.dt, x.A, _workspace.get(2, shape, x.u))  # Q_t = G_t dA_t h_{t-1} = dLoss/d(dt_t A)
        Q[:, 0].zero_()
        Q[:, 1:].mul_(h[:, :-1])
        Q.mul_(G)
        grad_A = torch.mul(Q, x.dt[:, :, None, :], out=_workspace.get(1, shape, x.u)).sum((0, 1))  # (N, D)
        grad_dt = x.u * GB + Q.mul_(x.A).sum(2)
        grad_raw = grad_dt * torch.sigmoid(x.raw) if ctx.delta_softplus else grad_dt

        def back(t: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(like.dtype)

        return (
            back(grad_u.transpose(1, 2), u),
            back(grad_raw.transpose(1, 2), delta),
            back(grad_A.t(), A),
            back(grad_B.transpose(1, 2), B),
            back(grad_C.transpose(1, 2), C),
            back(grad_D, D),
            back(grad_z.transpose(1, 2) if grad_z is not None else None, z),
            back(grad_raw.sum((0, 1)) if delta_bias is not None else None, delta_bias),
            None,
            None,
        )


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    scan: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's `selective_scan_fn` in plain PyTorch (real A; B, C of shape (B, N, L)).

    Returns out (B, D, L) in u's dtype, stored time-major (so "b d l -> b l d" is free), or
    (out, last_state (B, D, N)), without gradient, like mamba-ssm. return_last_state always takes
    the PyTorch scan.
    """
    _check_shapes(u, delta, A, B, C)
    if not return_last_state and _wants_triton(scan, u, delta, A, B, C, D, z, delta_bias):
        with falling_back("triton"):
            if triton_agrees(u.device):
                out = scan_triton.selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
                note_ran("triton")
                return out
    note_ran("torch")
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _wants_triton(scan: str, *tensors: Tensor | None) -> bool:
    """Whether `selective_scan` tries the Triton kernels: "auto" on CUDA inputs, "triton" on any the
    kernels take, never with "torch" or once they have failed in this process."""
    if scan not in ("auto", "torch", "triton"):
        raise ValueError(f"scan {scan!r}: want auto, torch or triton")
    if scan == "torch" or has_failed("triton") or (scan == "auto" and not tensors[0].is_cuda):
        return False
    if scan_triton.triton is None and scan_triton.broken():  # installed but broken: say so, once
        fall_back("triton", f"triton is installed but does not import: {scan_triton.broken()}")
        return False
    return scan_triton.supports(*tensors)


def triton_agrees(device: torch.device | str) -> bool:
    """Whether the Triton kernels match this module's scan on `device` (once per device and process,
    on `TRITON_CHECK_SHAPE`): a miscompiled kernel would otherwise train a model silently wrong.
    A mismatch calls `fall_back`; a compile or launch failure raises. Leaves the global RNG alone
    (exact resume depends on it).
    """
    key = str(torch.device(device))
    if not passed_check(key) and not has_failed("triton"):
        # It may be first called inside a model's forward, under inference_mode, no_grad or autocast.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(torch.device(key).type, enabled=False):
            error = _triton_error(torch.device(key))
        if error < 1e-3:
            note_passed_check(key)
        else:
            fall_back("triton", f"it disagrees with the PyTorch scan on {key}, relative error {error:.2g}")
    return passed_check(key) and not has_failed("triton")


# triton_agrees's problem: batch, channels (a partial channel block), states, positions (two chunks,
# the second partial).
TRITON_CHECK_SHAPE = (2, 24, 16, 40)


def _triton_error(device: torch.device) -> float:
    """Largest Triton-vs-PyTorch difference of out and gradients, relative to max(1, biggest value)."""
    g = torch.Generator().manual_seed(0)
    batch, dim, nstate, length = TRITON_CHECK_SHAPE
    shapes = {"u": (batch, dim, length), "delta": (batch, dim, length), "B": (batch, nstate, length),
              "C": (batch, nstate, length), "D": (dim,), "z": (batch, dim, length), "delta_bias": (dim,)}  # fmt: skip
    x = {k: (0.5 * torch.randn(*shape, generator=g)).to(device) for k, shape in shapes.items()}
    x["A"] = (-0.2 - 2 * torch.rand(dim, nstate, generator=g)).to(device)
    weight = torch.randn(batch, dim, length, generator=g).to(device)

    def run(scan) -> list[Tensor]:
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        out = scan(**leaves)
        (out * weight).sum().backward()
        return [out.detach()] + [leaves[k].grad for k in sorted(leaves)]

    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    got = run(lambda **v: scan_triton.selective_scan_triton(**v, delta_softplus=True))
    want = run(lambda **v: _SelectiveScan.apply(*(v[k] for k in order), True, False))
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() for a, b in zip(got, want))


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The recurrence as a plain loop over positions (mamba-ssm's `selective_scan_ref`), for tests."""
    _check_shapes(u, delta, A, B, C)
    f = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    uf, delta, A, B, C = (t.to(f) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, uf)
    h = uf.new_zeros(uf.shape[0], uf.shape[1], A.shape[1])  # (B, D, N)
    ys = []
    for t in range(uf.shape[2]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + uf * D.to(f)[:, None]
    if z is not None:
        out = out * F.silu(z.to(f))
    out = out.to(u.dtype)
    return (out, h) if return_last_state else out
