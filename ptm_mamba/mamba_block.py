"""The Mamba mixer (mamba-ssm's `mamba_simple.Mamba`) in plain PyTorch, which can also run
mamba-ssm's fused CUDA kernels, and `make_mixer`, which checks the choice of kernels.

`Mamba` has mamba-ssm's constructor, parameter names, shapes and initialisation, so state dicts
move between the two with strict=True. Per block, for hidden states (B, L, d_model):

    x, z = in_proj(h)                      two (B, d_inner, L) halves, d_inner = expand * d_model
    x    = silu(causal depthwise conv1d(x))
    dt, B, C = x_proj(x)                   (dt_rank, d_state, d_state) per position
    y    = selective_scan(x, dt_proj.weight @ dt, -exp(A_log), B, C, D, z,
                          delta_bias=dt_proj.bias, delta_softplus=True)     gated by silu(z)
    out  = out_proj(y)                     (B, L, d_model)

Position t only ever reads positions <= t (causal conv, forward scan), so right-padded batches need
no mask: the padding cannot change the outputs at real positions.

`scan` (model.scan): "fused" runs it all in mamba-ssm's `mamba_inner_fn` (needs its CUDA extensions
and causal-conv1d); "triton"/"torch" pick the selective scan's kernels; "auto" takes "fused" on CUDA
where installed, else the scan's "auto". Run-time failures warn once and fall back to PyTorch
(`ptm_mamba.kernels.fall_back`); a choice that cannot run here is refused by `check_scan`.
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ptm_mamba import scan_triton
from ptm_mamba.errors import PipelineError
from ptm_mamba.kernels import describe, falling_back, has_failed, note_ran
from ptm_mamba.scan import selective_scan

SCANS = ("auto", "torch", "triton", "fused")


@functools.cache
def fused_ops() -> ModuleType | None:
    """mamba-ssm's fused kernels, or None where not installed; a broken install raises its import error."""
    try:
        return importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except ModuleNotFoundError as exc:
        if exc.name != "mamba_ssm":
            raise
        return None


def unavailable(scan: str) -> str | None:
    """Why the kernels `scan` names cannot run in this process, or None ("auto" and "torch" always can)."""
    if scan == "triton":
        return scan_triton.unavailable()
    if scan == "fused":
        if not torch.cuda.is_available():
            return "no CUDA GPU"
        try:
            if fused_ops() is None:
                return "mamba-ssm is not installed"
        except Exception as exc:  # noqa: BLE001 - ImportError, OSError, RuntimeError from its CUDA extension
            return f"mamba-ssm does not import: {describe(exc)}"
    return None


def check_scan(scan: str) -> None:
    """A one-line PipelineError unless `scan` is one of SCANS and can run here."""
    if scan not in SCANS:
        raise PipelineError(f"model.scan: {scan!r} is not one of {', '.join(SCANS)}")
    reason = unavailable(scan)
    if reason is not None:
        raise PipelineError(f"model.scan: {scan!r} cannot run here ({reason}); use auto or torch")


class Mamba(nn.Module):
    """mamba-ssm's `Mamba` block (same signature, parameters and math) on `selective_scan`.

    `use_fast_path` is accepted for compatibility and ignored.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        scan: str = "auto",
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.scan = scan
        # Used when the fused block is not (or fails); tests swap in `selective_scan_ref`.
        self.scan_fn = functools.partial(selective_scan, scan="torch" if scan == "fused" else scan)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,  # depthwise
            padding=d_conv - 1,
            bias=conv_bias,
            **factory,
        )
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj.weight keeps the variance of dt; its bias is softplus^-1 of a step size drawn
        # log-uniformly in [dt_min, dt_max], so softplus(bias) starts in that range.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError(f"dt_init must be 'constant' or 'random', got {dt_init!r}")
        log_dt = torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True  # a model-wide init that zeroes biases must skip this one

        # S4D-real: A = -(1, 2, ..., d_state) in every channel, stored as log(-A) in fp32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # skip connection, fp32

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: Tensor, inference_params: Any = None) -> Tensor:
        if inference_params is not None:
            raise NotImplementedError("step-by-step decoding (inference_params) is not implemented")
        seqlen = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2 * d_inner, L)
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        if self._wants_fused(hidden_states):
            with falling_back("fused"):
                out = self._fused(xz, A)
                if out is not None:
                    note_ran("fused")
                    return out
        x, z = xz.chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :seqlen])  # causal: pad d_conv-1 on both sides, keep the first L
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2 * d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, d_inner, L); bias goes in the scan
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (B, d_state, L)
        y = self.scan_fn(
            x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True
        )
        return self.out_proj(y.transpose(1, 2))

    def _wants_fused(self, hidden_states: Tensor) -> bool:
        """Whether to try mamba-ssm's kernels (never once they have failed in this process)."""
        wanted = self.scan == "fused" or (self.scan == "auto" and hidden_states.is_cuda)
        return wanted and not has_failed("fused")

    def _fused(self, xz: Tensor, A: Tensor) -> Tensor | None:
        """The block in mamba-ssm's `mamba_inner_fn`, or None where mamba-ssm is not installed."""
        ops = fused_ops()
        if ops is None:
            return None
        return ops.mamba_inner_fn(
            xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
            self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )  # fmt: skip


def make_mixer(d_model: int, layer_idx: int | None = None, scan: str = "auto", **ssm_cfg: Any) -> Mamba:
    """A Mamba block on the kernels `scan` names, checked to run here; ssm_cfg: other `Mamba` arguments."""
    check_scan(scan)
    return Mamba(d_model, layer_idx=layer_idx, scan=scan, **ssm_cfg)
