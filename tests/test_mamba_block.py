"""The PyTorch Mamba block: mamba-ssm's parameter layout and init, causality, state dicts, the mixer factory."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from ptm_mamba import mamba_block
from ptm_mamba.errors import PipelineError
from ptm_mamba.mamba_block import Mamba, make_mixer
from ptm_mamba.kernels import has_failed
from ptm_mamba.scan import selective_scan_ref

FUSED = mamba_block.unavailable("fused") is None  # mamba-ssm and a GPU

# mamba-ssm's mamba_simple.Mamba for d_model=24, d_state=8, d_conv=4, expand=2: d_inner = 48,
# dt_rank = ceil(24 / 16) = 2; A_log and D are registered on the block itself, so they come first.
EXPECTED_LAYOUT = [
    ("A_log", (48, 8)),  # (d_inner, d_state)
    ("D", (48,)),  # (d_inner,)
    ("in_proj.weight", (96, 24)),  # (2 * d_inner, d_model)
    ("conv1d.weight", (48, 1, 4)),  # (d_inner, 1, d_conv): depthwise
    ("conv1d.bias", (48,)),
    ("x_proj.weight", (18, 48)),  # (dt_rank + 2 * d_state, d_inner)
    ("dt_proj.weight", (48, 2)),  # (d_inner, dt_rank)
    ("dt_proj.bias", (48,)),
    ("out_proj.weight", (24, 48)),  # (d_model, d_inner)
]


def block(seed: int = 0, **kw) -> Mamba:
    torch.manual_seed(seed)
    return Mamba(24, d_state=8, dtype=torch.float64, **kw)


def test_parameter_layout_matches_mamba_ssm() -> None:
    m = block()
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == EXPECTED_LAYOUT
    assert (m.d_inner, m.dt_rank) == (48, 2)
    assert m.A_log.dtype == m.D.dtype == torch.float32  # kept in fp32 whatever the block's dtype
    assert m.in_proj.weight.dtype == torch.float64


def test_layout_options() -> None:
    m = Mamba(24, d_state=8, dt_rank=5, bias=True, conv_bias=False)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert "conv1d.bias" not in shapes
    assert shapes["in_proj.bias"] == (96,) and shapes["out_proj.bias"] == (24,)
    assert shapes["x_proj.weight"] == (5 + 16, 48) and shapes["dt_proj.weight"] == (48, 5)


def test_initialisation() -> None:
    m = Mamba(64, d_state=16, dt_min=0.01, dt_max=0.05)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))
    step = F.softplus(m.dt_proj.bias)
    assert step.min() >= 0.01 * (1 - 1e-5) and step.max() <= 0.05 * (1 + 1e-5)
    assert m.dt_proj.weight.abs().max() <= m.dt_rank**-0.5
    assert m.dt_proj.bias._no_reinit
    constant = Mamba(64, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(constant.dt_proj.weight, torch.full_like(constant.dt_proj.weight, 2 * 4**-0.5))


def test_forward_equals_reference_scan() -> None:
    """Output and every parameter gradient equal those of the same block on the sequential reference."""
    fast, ref = block(), block()
    ref.scan_fn = selective_scan_ref
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    out, ref_out = fast(x), ref(x)
    assert out.shape == (2, 13, 24)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_causal() -> None:
    """Changing position t changes nothing before t (and does change position t)."""
    m = block()
    x = torch.randn(1, 20, 24, dtype=torch.float64)
    out = m(x)
    for t in (0, 7, 19):
        x2 = x.clone()
        x2[:, t] += 1.0
        out2 = m(x2)
        assert torch.equal(out2[:, :t], out[:, :t])
        assert not torch.allclose(out2[:, t], out[:, t])


def test_right_padding_needs_no_mask() -> None:
    """A sequence alone and right-padded in a batch give the same outputs at its real positions."""
    m = block()
    short, long = torch.randn(1, 6, 24, dtype=torch.float64), torch.randn(1, 15, 24, dtype=torch.float64)
    batch = torch.cat([F.pad(short, (0, 0, 0, 9), value=3.0), long])
    torch.testing.assert_close(m(batch)[:1, :6], m(short))


def test_state_dict_round_trip() -> None:
    m = block(seed=1)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = block(seed=2)
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    torch.testing.assert_close(other(x), m(x), rtol=0, atol=0)


def test_inference_params_rejected() -> None:
    with pytest.raises(NotImplementedError):
        block()(torch.randn(1, 3, 24, dtype=torch.float64), inference_params=object())


def test_make_mixer() -> None:
    m = make_mixer(32, layer_idx=3, scan="torch", d_state=4, expand=3)
    assert type(m) is Mamba and (m.layer_idx, m.d_state, m.d_inner, m.scan) == (3, 4, 96, "torch")
    with pytest.raises(PipelineError, match="'gpu'"):
        make_mixer(32, scan="gpu")
    assert make_mixer(32).scan == "auto"
    if not FUSED:
        with pytest.raises(PipelineError, match="fused"):
            make_mixer(32, scan="fused")


@pytest.mark.skipif(not FUSED, reason="needs mamba_ssm and CUDA")
@pytest.mark.parametrize("scan", ["torch", "fused"])
def test_matches_mamba_ssm_fused_block(scan) -> None:
    """Ours in PyTorch, and ours on mamba-ssm's `mamba_inner_fn`, against mamba-ssm's own block."""
    simple = pytest.importorskip("mamba_ssm.modules.mamba_simple")
    torch.manual_seed(0)
    theirs = simple.Mamba(64, d_state=16, layer_idx=0).cuda()
    ours = Mamba(64, d_state=16, scan=scan).cuda()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 200, 64, device="cuda")
    out, their_out = ours(x), theirs(x)
    assert not has_failed("fused")  # it did run mamba-ssm's kernels
    torch.testing.assert_close(out, their_out, rtol=1e-3, atol=1e-4)
    out.square().sum().backward()
    their_out.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        scale = q.grad.abs().max().item()
        assert (p.grad - q.grad).abs().max().item() <= 1e-3 * max(scale, 1e-3), name
