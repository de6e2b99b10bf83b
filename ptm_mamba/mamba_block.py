"""The Mamba mixer (mamba-ssm's `mamba_simple.Mamba`) in plain PyTorch, plus a factory that picks
mamba-ssm's fused CUDA version when it is there.

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
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ptm_mamba.errors import PipelineError
from ptm_mamba.scan import selective_scan

try:  # mamba-ssm's CUDA build; importing it can fail in many ways on machines without it
    from mamba_ssm.modules.mamba_simple import Mamba as FusedMamba
except Exception:  # noqa: BLE001 - ImportError, or OSError/RuntimeError from a broken CUDA extension
    FusedMamba = None

FUSED_AVAILABLE: bool = FusedMamba is not None and torch.cuda.is_available()
BACKENDS = ("auto", "torch", "fused")


class Mamba(nn.Module):
    """mamba-ssm's `Mamba` block (same signature, parameters and math) on `selective_scan`.

    `use_fast_path` is accepted for compatibility and ignored: this class has only the PyTorch path
    (use `make_mixer` to get the fused kernels). hidden_states: (B, L, d_model) -> (B, L, d_model).
    """

    # The scan function; tests swap in `selective_scan_ref` on an instance.
    scan_fn: Callable[..., Tensor] = staticmethod(selective_scan)

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
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # skip connection, fp32
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: Tensor, inference_params: Any = None) -> Tensor:
        """hidden_states: (B, L, d_model) -> (B, L, d_model)."""
        if inference_params is not None:
            raise NotImplementedError("step-by-step decoding (inference_params) is not implemented")
        seqlen = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :seqlen])  # causal: pad d_conv-1 on both sides, keep the first L
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2 * d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, d_inner, L); bias goes in the scan
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (B, d_state, L)
        y = self.scan_fn(
            x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True
        )
        return self.out_proj(y.transpose(1, 2))


def make_mixer(d_model: int, layer_idx: int | None = None, backend: str = "auto", **ssm_cfg: Any) -> nn.Module:
    """A Mamba block: mamba-ssm's fused one or ours, which share one state-dict layout.

    backend: "fused" (mamba-ssm, needs it installed and CUDA), "torch" (ours), or "auto" (fused when
    available and no CPU device is asked for). ssm_cfg: the other `Mamba` constructor arguments.
    """
    if backend not in BACKENDS:
        raise PipelineError(f"mixer backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "fused" and not FUSED_AVAILABLE:
        raise PipelineError("mixer backend 'fused' needs the mamba_ssm package and a CUDA GPU; use 'torch' or 'auto'")
    device = ssm_cfg.get("device")
    on_cpu = device is not None and torch.device(device).type != "cuda"
    fused = backend == "fused" or (backend == "auto" and FUSED_AVAILABLE and not on_cpu)
    cls = FusedMamba if fused else Mamba
    return cls(d_model, layer_idx=layer_idx, **ssm_cfg)
