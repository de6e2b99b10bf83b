"""The fast selective scan against the sequential reference: outputs, last states and gradients."""

from __future__ import annotations

import pytest
import torch

from ptm_mamba.scan import _scan_, release_workspace, selective_scan, selective_scan_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    length: int,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    batch: int = 2,
    dim: int = 3,
    nstate: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random scan inputs with mamba's shapes; A < 0 as in a Mamba block."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = {
        "u": rand(batch, dim, length),
        "delta": 0.5 * rand(batch, dim, length),
        "A": -torch.rand(dim, nstate, generator=g, dtype=torch.float64) * 3 - 0.1,
        "B": rand(batch, nstate, length),
        "C": rand(batch, nstate, length),
        "D": rand(dim),
        "z": rand(batch, dim, length),
        "delta_bias": 0.5 * rand(dim),
    }
    return {k: v.to(dtype=dtype, device=device) for k, v in x.items()}


def run(fn, inputs: dict[str, torch.Tensor], softplus: bool, weight: torch.Tensor):
    """Output of fn and the gradients of sum(out * weight) w.r.t. every input (None where unused)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves, delta_softplus=softplus)
    grads = torch.autograd.grad((out.double() * weight).sum(), list(leaves.values()))
    return out, dict(zip(leaves, grads))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max(1, max |expected|)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} at scale {scale:.3g}"


# (which optional inputs are given, delta_softplus)
OPTIONS = [
    (("D", "z", "delta_bias"), True),  # as a Mamba block calls it
    ((), False),
    (("D",), False),
    (("z",), True),
    (("delta_bias",), True),
    (("D", "z", "delta_bias"), False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("given,softplus", OPTIONS)
def test_matches_reference_float64(device: str, length: int, given: tuple[str, ...], softplus: bool) -> None:
    inputs = {k: v for k, v in make_inputs(length, device=device).items() if k in ("u", "delta", "A", "B", "C") + given}
    weight = torch.randn(2, 3, length, dtype=torch.float64, device=device)
    out, grads = run(selective_scan, inputs, softplus, weight)
    ref_out, ref_grads = run(selective_scan_ref, inputs, softplus, weight)
    assert out.shape == (2, 3, length) and out.dtype == torch.float64
    assert_close(out, ref_out, 1e-12, "out")
    for name in inputs:
        assert grads[name].shape == inputs[name].shape
        assert_close(grads[name], ref_grads[name], 1e-11, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [5, 100])
def test_matches_reference_float32(device: str, length: int) -> None:
    """fp32 inputs: both paths compute in fp32; compare against the fp64 reference on the same values."""
    inputs = make_inputs(length, dtype=torch.float32, device=device, dim=8, nstate=16)
    weight = torch.randn(2, 8, length, dtype=torch.float64, device=device)
    out, grads = run(selective_scan, inputs, True, weight)
    truth, true_grads = run(selective_scan_ref, {k: v.double() for k, v in inputs.items()}, True, weight)
    assert out.dtype == torch.float32
    assert_close(out, truth, 1e-5, "out")
    for name in inputs:
        assert grads[name].dtype == torch.float32
        assert_close(grads[name], true_grads[name], 1e-4, f"grad {name}")


def test_gradcheck() -> None:
    """Finite differences, independent of the reference."""
    inputs = make_inputs(6, batch=1, dim=2, nstate=3)
    leaves = [v.requires_grad_() for v in inputs.values()]
    assert torch.autograd.gradcheck(lambda *xs: selective_scan(*xs, delta_softplus=True), leaves)


def test_half_precision_inputs_compute_in_fp32() -> None:
    inputs = make_inputs(20, dtype=torch.bfloat16, dim=8)
    inputs["A"], inputs["D"], inputs["delta_bias"] = (inputs[k].float() for k in ("A", "D", "delta_bias"))
    weight = torch.randn(2, 8, 20, dtype=torch.float64)
    out, grads = run(selective_scan, inputs, True, weight)
    ref_out, ref_grads = run(selective_scan_ref, inputs, True, weight)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref_out, 1e-2, "out")  # the same fp32 values up to a bf16 rounding step
    assert all(grads[k].dtype == inputs[k].dtype for k in inputs)
    assert_close(grads["A"], ref_grads["A"], 1e-4, "grad A")  # fp32 parameter: fp32 accuracy


@pytest.mark.parametrize("device", DEVICES)
def test_last_state(device: str) -> None:
    inputs = make_inputs(9, device=device)
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    assert last.shape == (2, 3, 4)
    assert_close(out, ref_out, 1e-12, "out")
    assert_close(last, ref_last, 1e-12, "last state")
    # The state after the whole sequence, without the readout: C = 1 in state 0 only, D = 0, no gate.
    C = torch.zeros_like(inputs["C"])
    C[:, 0] = 1
    x = inputs
    y = selective_scan(x["u"], x["delta"], x["A"], x["B"], C, delta_bias=x["delta_bias"], delta_softplus=True)
    torch.testing.assert_close(y[:, :, -1], last[:, :, 0])


def test_strong_decay_and_long_sequence_stay_finite() -> None:
    """exp(delta * A) underflows to 0 here (delta*A ~ -1e4 per step); nothing may overflow or divide by it."""
    inputs = make_inputs(700, dtype=torch.float32)
    inputs["A"] = inputs["A"] * 1000
    inputs["delta"] = inputs["delta"].abs() * 20
    out = selective_scan(**inputs, delta_softplus=True)
    assert torch.isfinite(out).all()
    truth = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    assert_close(out, truth, 1e-5, "out")
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    selective_scan(**leaves, delta_softplus=True).sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


def test_workspace_reuse_across_shapes() -> None:
    """Scratch buffers kept between calls must not leak values from a larger earlier call."""
    big, small = make_inputs(50, dim=5, nstate=6, seed=1), make_inputs(11, seed=2)
    selective_scan(**big, delta_softplus=True)
    first = selective_scan(**small, delta_softplus=True)
    release_workspace()
    torch.testing.assert_close(selective_scan(**small, delta_softplus=True), first, rtol=0, atol=0)
    torch.testing.assert_close(first, selective_scan_ref(**small, delta_softplus=True))


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_primitive(reverse: bool) -> None:
    """The in-place Blelloch scan equals the step-by-step recurrence, in both directions, for every length."""
    for length in range(1, 20):
        a, b = torch.rand(2, length, 3, dtype=torch.float64), torch.randn(2, length, 3, dtype=torch.float64)
        expected, h = torch.empty_like(b), torch.zeros_like(b[:, 0])
        for t in reversed(range(length)) if reverse else range(length):
            h = a[:, t] * h + b[:, t]
            expected[:, t] = h
        torch.testing.assert_close(_scan_(a.clone(), b.clone(), reverse=reverse), expected)


def test_rejects_unsupported_shapes() -> None:
    inputs = make_inputs(4)
    with pytest.raises(ValueError, match="per-position B, C"):
        selective_scan(**{**inputs, "B": inputs["B"][:, None]})  # grouped B (B, G, N, L)
    with pytest.raises(ValueError, match="A must be real"):
        selective_scan(**{**inputs, "A": inputs["A"][:2]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba_ssm's kernel needs CUDA")
def test_matches_mamba_ssm_kernel() -> None:
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    inputs = make_inputs(300, dtype=torch.float32, device="cuda", dim=16, nstate=8)
    weight = torch.randn(2, 16, 300, dtype=torch.float64, device="cuda")
    out, grads = run(selective_scan, inputs, True, weight)
    theirs, their_grads = run(interface.selective_scan_fn, inputs, True, weight)
    assert_close(out, theirs, 1e-4, "out")
    for name in inputs:
        assert_close(grads[name], their_grads[name], 1e-3, f"grad {name}")
