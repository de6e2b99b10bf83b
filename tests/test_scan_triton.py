"""The Triton selective scan (`ptm_mamba.scan_triton`) against the sequential reference, and the
`scan` switch of `ptm_mamba.scan.selective_scan` (its fallbacks: tests/test_scan_fallback.py).

Where the kernels run: on CUDA when there is a GPU; otherwise under Triton's interpreter on CPU
tensors (triton is in the dev extra; tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
triton, and this module does too when run alone). Without triton the kernel tests are skipped and
only the switch is tested. Interpreter shapes are tiny and chunks short (`configure(chunk=4)`), so
that every length below spans several chunks, the last one partial: the interpreter is slow.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()

if HAS_TRITON and not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # stays set: triton reads it again when it lazily imports parts of itself

from ptm_mamba import kernels, scan, scan_triton  # noqa: E402  (after the interpreter switch above)
from ptm_mamba.scan import selective_scan, selective_scan_ref  # noqa: E402

needs_triton = pytest.mark.skipif(
    scan_triton.triton is None or not (CUDA or scan_triton.INTERPRET),
    reason="needs triton, and without CUDA its interpreter: run with TRITON_INTERPRET=1 "
    "(triton was imported before this module could set it)",
)
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def tune():
    """`scan_triton.configure` for one test; the defaults again after it."""
    yield scan_triton.configure
    scan_triton.configure()


@pytest.fixture
def fresh():
    """This process's record of kernels run, failed and checked, empty for one test."""
    record = kernels.reset()
    yield
    kernels.reset(record)


def make_inputs(batch, dim, nstate, length, *, D=True, z=True, bias=True, seed=0, dtype=torch.float32):
    """Block-like inputs (A < 0, small delta) on DEVICE; None for the options left out."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype)

    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length, scale=0.5),
        "A": (-0.2 - 2 * torch.rand(dim, nstate, generator=g)).to(DEVICE),  # fp32, as -exp(A_log) is
        "B": randn(batch, nstate, length),
        "C": randn(batch, nstate, length),
        "D": randn(dim) if D else None,
        "z": randn(batch, dim, length) if z else None,
        "delta_bias": randn(dim, scale=0.3) if bias else None,
    }


def run(fn, inputs, weight, softplus, upcast=False):
    """out and the gradients of sum(out * weight) with respect to every input given."""
    def leaf(v):
        return None if v is None else (v.float() if upcast else v).detach().clone().requires_grad_()

    leaves = {k: leaf(v) for k, v in inputs.items()}
    out = fn(**leaves, delta_softplus=softplus)
    (out.float() * weight).sum().backward()
    return out, {k: v.grad for k, v in leaves.items() if v is not None}


def assert_matches(inputs, softplus, rtol, atol):
    weight = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = run(scan_triton.selective_scan_triton, inputs, weight, softplus)
    ref_out, ref_grads = run(selective_scan_ref, inputs, weight, softplus, upcast=True)
    assert out.dtype == inputs["u"].dtype and out.shape == inputs["u"].shape
    torch.testing.assert_close(out.float(), ref_out, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        scale = ref_grads[name].abs().max().item()  # gradients summed over many terms: relative to their size
        atol_g = atol * max(scale, 1.0)
        torch.testing.assert_close(grads[name].float(), ref_grads[name], rtol=rtol, atol=atol_g, msg=name)


@needs_triton
@pytest.mark.parametrize(
    "shape, options, softplus",
    [
        ((2, 20, 16, 7), {}, True),  # D = 20: a partial channel block
        ((1, 8, 4, 13), {"D": False, "z": False, "bias": False}, False),  # N = 4, bare recurrence
        ((1, 17, 5, 9), {"D": False, "bias": False}, True),  # N = 5: padded to 8
        ((2, 16, 16, 1), {}, True),  # a single position
        ((1, 16, 16, 11), {"z": False}, False),
    ],
)
def test_matches_reference_fp32(shape, options, softplus, tune):
    tune(chunk=4, block="16x2")  # one compile per case on a GPU; tuning is tested below
    assert_matches(make_inputs(*shape, **options), softplus, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("chunk, length", [(2, 9), (8, 8), (8, 21), (64, 5)])
def test_chunk_sizes(chunk, length, tune):
    """Chunks of 2 (many), one exact chunk, a partial last chunk, and the default size (one chunk)."""
    tune(chunk=chunk)
    assert_matches(make_inputs(1, 16, 3, length, seed=chunk + length), True, rtol=1e-4, atol=1e-4)


@needs_triton
def test_forward_without_grad_keeps_no_states(monkeypatch, tune):
    """Under no_grad the forward kernel skips the chunk states (another compiled variant): same out."""
    tune(chunk=4)
    launched = []
    real_launch = scan_triton._launch
    monkeypatch.setattr(
        scan_triton, "_launch", lambda *a, **k: launched.append(k["STORE_STATES"]) or real_launch(*a, **k)
    )
    x = make_inputs(2, 16, 4, 10, seed=11)
    with torch.no_grad():
        out = scan_triton.selective_scan_triton(**x, delta_softplus=True)
    assert launched == [False]
    torch.testing.assert_close(out, selective_scan_ref(**x, delta_softplus=True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args", [{"chunk": 3}, {"chunk": 1}, {"block": "big"}, {"block": "8x4"}, {"block": "32x3"}])
def test_configure_checks_its_arguments(args, tune):
    with pytest.raises(ValueError, match=" ".join(f"{k} {v!r}" for k, v in args.items())):
        tune(**args)


@needs_triton
def test_bf16_inputs_match_reference_on_upcast_inputs(tune):
    """bf16 in, fp32 arithmetic: out within bf16 rounding of the reference on the same (upcast) values."""
    tune(chunk=4)
    assert_matches(make_inputs(2, 16, 16, 10, dtype=torch.bfloat16, seed=3), True, rtol=2e-2, atol=2e-2)


@needs_triton
def test_transposed_view_inputs_and_time_major_out(tune):
    """The Mamba block passes (B, L, X) tensors transposed to (B, X, L): the results must not change."""
    tune(chunk=4)
    x = make_inputs(1, 24, 16, 6, seed=5)
    views = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if v is not None and v.dim() == 3 else v
             for k, v in x.items()}  # fmt: skip
    out = scan_triton.selective_scan_triton(**views, delta_softplus=True)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, selective_scan_ref(**x, delta_softplus=True), rtol=1e-4, atol=1e-4)


ON_GPU = pytest.mark.skipif(not (CUDA and scan_triton.triton is not None), reason="needs CUDA and triton")


@ON_GPU
def test_autotuned_configs_on_gpu():
    """All configs tuned, at a size where the channel blocks and the partial sums differ between them."""
    assert_matches(make_inputs(3, 200, 16, 300, seed=7), True, rtol=1e-3, atol=1e-4)


@ON_GPU
def test_selective_scan_dispatches_to_triton_on_cuda(monkeypatch, fresh):
    calls = []
    real = scan_triton.selective_scan_triton
    monkeypatch.setattr(scan_triton, "selective_scan_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = make_inputs(1, 32, 16, 8)
    kernels.note_passed_check(str(x["u"].device))  # the check is tested on its own
    for choice, expected_calls in (("auto", 1), ("triton", 2), ("torch", 2)):
        out = selective_scan(**x, delta_softplus=True, scan=choice)
        assert len(calls) == expected_calls, choice
        torch.testing.assert_close(out, selective_scan_ref(**x, delta_softplus=True), rtol=1e-4, atol=1e-4)
    selective_scan(**x, delta_softplus=True, return_last_state=True)  # not a Triton case: PyTorch
    assert len(calls) == 2
    assert kernels.what_ran() == "triton, torch"


def test_auto_keeps_cpu_inputs_on_pytorch(monkeypatch, fresh):
    """Only "triton" runs the kernels on CPU tensors (under the interpreter); "auto" leaves them to PyTorch."""
    x = {k: v.cpu() if v is not None else None for k, v in make_inputs(1, 8, 4, 5).items()}
    monkeypatch.setattr(scan_triton, "selective_scan_triton", lambda *a, **k: pytest.fail("Triton path taken on CPU"))
    for choice in ("auto", "torch"):
        torch.testing.assert_close(selective_scan(**x, scan=choice), selective_scan_ref(**x), rtol=1e-5, atol=1e-5)
    assert kernels.what_ran() == "torch"


def test_switch_rejects_unknown_value():
    x = make_inputs(1, 4, 2, 3)
    with pytest.raises(ValueError, match="'cuda'"):
        selective_scan(**x, scan="cuda")


def test_scan_dispatches_through_this_module():
    """`ptm_mamba.scan` holds the same module object the tests patch; the kernels run where triton
    imports and there is a GPU or the interpreter."""
    assert scan.scan_triton is scan_triton
    assert (scan_triton.unavailable() is None) == (scan_triton.triton is not None and (CUDA or scan_triton.INTERPRET))


@needs_triton
def test_check_before_first_use_passes_and_catches_a_wrong_kernel(monkeypatch, fresh):
    """`triton_agrees` compares the kernels with the PyTorch scan once per device; a kernel that is
    off by 1% fails it, with one warning, and the verdict is kept. (On a smaller problem than the
    product's, two chunks still: the interpreter is slow; test_matches_reference_* cover the kernels.)"""
    monkeypatch.setattr(scan, "TRITON_CHECK_SHAPE", (1, 8, 4, 40))
    state = torch.random.get_rng_state()
    with torch.inference_mode():  # as it may be first called: inside a model's forward under eval
        assert scan.triton_agrees(DEVICE)
    assert torch.equal(torch.random.get_rng_state(), state)  # the training RNG stream is untouched

    wrong = lambda **inputs: selective_scan_ref(**inputs) * 1.01  # noqa: E731
    monkeypatch.setattr(scan_triton, "selective_scan_triton", wrong)
    assert scan.triton_agrees(DEVICE)  # kept from the first check
    kernels.reset()
    with pytest.warns(RuntimeWarning, match="disagrees with the PyTorch scan") as caught:
        assert not scan.triton_agrees(DEVICE)
    assert not scan.triton_agrees(DEVICE)
    assert len(caught) == 1 and kernels.has_failed("triton")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_compile_for_hopper():
    """The interpreter is lenient; the compiler is not. Both kernels compile for sm_90 (one config,
    bf16 inputs, with every option on) and ptxas accepts them: bench/triton_compile.py, without
    TRITON_INTERPRET, in its own process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parent.parent / "bench" / "triton_compile.py"
    done = subprocess.run([sys.executable, str(script), "--config", "16x4"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "chunk" in line]
    assert [line.split()[0] for line in lines] == ["_fwd_kernel", "_bwd_kernel"], done.stdout
    assert all("Used" in line and "registers" in line for line in lines), done.stdout
