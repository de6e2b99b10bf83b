"""Kernels that fail fall back to PyTorch with one warning; kernels asked for that cannot run are errors.

Each failure is injected at the lowest call: the Triton kernel launcher
(`scan_triton._launch`), the check before first use (`scan.triton_agrees`), and mamba-ssm's fused
block function (`mamba_inner_fn` of a stand-in mamba_ssm package put on sys.path). Without a GPU,
"triton" runs the kernels on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); "fused" blocks are made with `Mamba(scan="fused")`, as `make_mixer` refuses
them without a GPU.
"""

import sys
import types
import warnings

import pytest
import torch

from test_scan_triton import fresh, make_inputs, needs_triton, tune  # noqa: F401  (fixtures)
from ptm_mamba import kernels, mamba_block, scan, scan_triton
from ptm_mamba.errors import PipelineError
from ptm_mamba.mamba_block import SCANS, Mamba, make_mixer
from ptm_mamba.model import ModelConfig, PTMMamba
from ptm_mamba.scan import selective_scan

CPU = not torch.cuda.is_available()


def calls_warned(fn, times=2):
    """fn()'s results over `times` calls, and the RuntimeWarnings they raised (Python's own once-only
    filter off, so any repeat would show)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [fn() for _ in range(times)]
    return results, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def raising(message, calls):
    def fail(*args, **kwargs):
        calls.append(1)
        raise RuntimeError(message)

    return fail


@needs_triton
def test_triton_that_does_not_compile_falls_back_once(monkeypatch, fresh):
    """A launcher that raises (Triton not finding libcuda, say): the check before first use fails,
    one warning naming the reason in one line, the PyTorch scan's results, and no second try."""
    calls = []
    monkeypatch.setattr(scan_triton, "_launch", raising("cannot find libcuda.so\nsearched /usr/lib64", calls))
    x = make_inputs(1, 16, 4, 6)
    outs, warned = calls_warned(lambda: selective_scan(**x, delta_softplus=True, scan="triton"))
    assert warned == ["the Triton selective scan failed (RuntimeError: cannot find libcuda.so searched /usr/lib64); "
                      "using the PyTorch path in this process from now on"]
    assert len(calls) == 1
    want = selective_scan(**x, delta_softplus=True, scan="torch")
    for out in outs:
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert kernels.what_ran() == "torch (triton failed: RuntimeError: cannot find libcuda.so searched /usr/lib64)"


@needs_triton
def test_triton_that_fails_to_launch_after_its_check(monkeypatch, fresh, tune):
    """The kernels ran; a later launch raises: one warning, that call and the next ones in PyTorch,
    gradients included."""
    tune(chunk=4, block="16x2")  # one compile on a GPU
    x = make_inputs(1, 16, 4, 6)
    kernels.note_passed_check(str(x["u"].device))  # passed its check (tested in tests/test_scan_triton.py)
    with torch.no_grad():
        torch.testing.assert_close(selective_scan(**x, delta_softplus=True, scan="triton"),
                                   selective_scan(**x, delta_softplus=True, scan="torch"), rtol=1e-4, atol=1e-4)
    assert kernels.what_ran() == "triton, torch"

    calls = []
    monkeypatch.setattr(scan_triton, "_launch", raising("out of resources: shared memory", calls))
    leaves = {k: v.requires_grad_() for k, v in make_inputs(2, 8, 4, 5, seed=1).items()}

    def forward_backward():
        out = selective_scan(**leaves, delta_softplus=True, scan="triton")
        grads = torch.autograd.grad(out.square().sum(), list(leaves.values()))
        return out, grads

    results, warned = calls_warned(forward_backward)
    assert len(warned) == 1 and "(RuntimeError: out of resources: shared memory)" in warned[0]
    assert len(calls) == 1
    want_out = selective_scan(**leaves, delta_softplus=True, scan="torch")
    want_grads = torch.autograd.grad(want_out.square().sum(), list(leaves.values()))
    for out, grads in results:
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert kernels.what_ran() == "triton, torch (triton failed: RuntimeError: out of resources: shared memory)"


@needs_triton
def test_check_that_raises_falls_back(monkeypatch, fresh):
    calls = []
    monkeypatch.setattr(scan, "triton_agrees", raising("ptxas fatal: unsupported gpu architecture 'sm_100a'", calls))
    x = make_inputs(1, 8, 4, 5)
    outs, warned = calls_warned(lambda: selective_scan(**x, scan="triton"))
    assert len(warned) == 1 and "ptxas fatal" in warned[0] and "\n" not in warned[0]
    assert len(calls) == 1
    for out in outs:
        torch.testing.assert_close(out, selective_scan(**x, scan="torch"), rtol=0, atol=0)


@needs_triton
def test_out_of_memory_is_not_a_kernel_failure(monkeypatch, fresh):
    """Out of memory is raised as it is: the PyTorch scan would need more, and Triton stays on."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(scan_triton, "_launch", oom)
    x = make_inputs(1, 8, 4, 5)
    kernels.note_passed_check(str(x["u"].device))
    with pytest.raises(torch.OutOfMemoryError):
        selective_scan(**x, scan="triton")
    assert not kernels.has_failed("triton")


FAILING_AT_FIRST_FORWARD = '''
CALLS = []


def mamba_inner_fn(*args, **kwargs):
    CALLS.append(1)
    raise RuntimeError("selective_scan_cuda was not built: set MAMBA_BUILD_CUDA_OPS=1 and reinstall")
'''
MISSING_EXTENSION = "import selective_scan_cuda  # noqa: F401\n"


def mamba_ssm_modules():
    return [name for name in sys.modules if name.split(".")[0] == "mamba_ssm"]


@pytest.fixture
def mamba_ssm(tmp_path, monkeypatch):
    """install(source): a stand-in mamba_ssm package on sys.path in place of any real one, its
    `ops.selective_scan_interface` module holding `source`; the real import machinery loads it.
    Gone again after the test."""

    def install(source):
        ops = tmp_path / "mamba_ssm" / "ops"
        ops.mkdir(parents=True)
        for init in (ops.parent / "__init__.py", ops / "__init__.py"):
            init.write_text("")
        (ops / "selective_scan_interface.py").write_text(source)
        for name in mamba_ssm_modules():
            monkeypatch.delitem(sys.modules, name)  # a real one imported before: back after the test
        monkeypatch.syspath_prepend(str(tmp_path))

    mamba_block.fused_ops.cache_clear()
    yield install
    mamba_block.fused_ops.cache_clear()
    for name in mamba_ssm_modules():
        del sys.modules[name]


def twin_blocks(scan_choice):
    """A block running `scan_choice` and a PyTorch-only one with the same weights."""
    torch.manual_seed(0)
    block = Mamba(24, d_state=4, scan=scan_choice)
    ref = Mamba(24, d_state=4, scan="torch")
    ref.load_state_dict(block.state_dict())
    return block, ref


@pytest.mark.parametrize("source, reason", [
    (FAILING_AT_FIRST_FORWARD, "RuntimeError: selective_scan_cuda was not built: set MAMBA_BUILD_CUDA_OPS=1"),
    (MISSING_EXTENSION, "ModuleNotFoundError: No module named 'selective_scan_cuda'"),
], ids=["fails at first forward", "extension does not import"])  # fmt: skip
def test_mamba_ssm_whose_cuda_ops_do_not_run_falls_back(source, reason, mamba_ssm, fresh):
    mamba_ssm(source)
    block, ref = twin_blocks("fused")
    x = torch.randn(2, 7, 24)
    outs, warned = calls_warned(lambda: block(x))
    assert len(warned) == 1 and warned[0].startswith(f"mamba-ssm's fused Mamba kernels failed ({reason}")
    assert "\n" not in warned[0]
    for out in outs:
        torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    if source is FAILING_AT_FIRST_FORWARD:  # called once, not again after the failure
        assert sys.modules["mamba_ssm.ops.selective_scan_interface"].CALLS == [1]
    assert kernels.what_ran().startswith(f"torch (fused failed: {reason}")


def test_auto_does_not_try_mamba_ssm_on_cpu(mamba_ssm, fresh):
    mamba_ssm(FAILING_AT_FIRST_FORWARD)
    block, ref = twin_blocks("auto")
    x = torch.randn(1, 5, 24)
    (out,), warned = calls_warned(lambda: block(x), times=1)
    assert warned == [] and "mamba_ssm" not in sys.modules
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)


def test_asking_for_triton_where_it_cannot_run_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(scan_triton, "triton", None)
    monkeypatch.setattr(scan_triton, "_IMPORT_ERROR", ModuleNotFoundError("No module named 'triton'"))
    with pytest.raises(PipelineError) as error:
        PTMMamba(ModelConfig(d_model=16, n_layer=1, esm_dim=8, scan="triton"))
    assert str(error.value) == ("model.scan: 'triton' cannot run here (triton does not import: No module named "
                                "'triton'); use auto or torch")
    monkeypatch.undo()
    if CPU:
        monkeypatch.setattr(scan_triton, "INTERPRET", False)
        with pytest.raises(PipelineError, match=r"^model.scan: 'triton' cannot run here \(no CUDA GPU\)"):
            make_mixer(16, scan="triton")


def test_asking_for_fused_where_it_cannot_run_is_a_one_line_error(monkeypatch, mamba_ssm):
    if CPU:
        with pytest.raises(PipelineError, match=r"^model.scan: 'fused' cannot run here \(no CUDA GPU\); use auto"):
            make_mixer(16, scan="fused")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, mamba-ssm broken
    mamba_ssm(MISSING_EXTENSION)
    with pytest.raises(PipelineError) as error:
        make_mixer(16, scan="fused")
    assert str(error.value) == ("model.scan: 'fused' cannot run here (mamba-ssm does not import: "
                                "ModuleNotFoundError: No module named 'selective_scan_cuda'); use auto or torch")


def test_config_key(tmp_path):
    """model.scan: one of SCANS, auto by default, into the ModelConfig training builds (and saves)."""
    pytest.importorskip("jsonschema")  # the GPU machines of bench/gpu_check.sh may lack it
    from ptm_mamba import train
    from ptm_mamba.config import validate
    from ptm_mamba.settings import Settings

    base = {"dataset": {"dataset_location": str(tmp_path / "data.csv")}}
    assert validate(base)["model"]["scan"] == "auto"
    for choice in SCANS:
        config = validate({**base, "model": {"scan": choice}})
        assert train.model_config(Settings.from_config(config), 8).to_dict()["scan"] == choice
    with pytest.raises(PipelineError, match="model.scan: 'cuda' is not one of") as error:
        validate({**base, "model": {"scan": "cuda"}})
    assert "\n" not in str(error.value)


def test_a_broken_triton_install_is_said_once_not_hidden(monkeypatch, fresh):
    """Triton not installed: "auto" takes PyTorch without a word. Installed but failing to import
    (e.g. a missing libcuda): one warning naming the import error, then PyTorch."""
    # inputs on a GPU, where "auto" would try the Triton kernels
    cuda_input = [types.SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cuda"),
                                        numel=lambda: 1)] * 5
    monkeypatch.setattr(scan_triton, "triton", None)
    monkeypatch.setattr(scan_triton, "_IMPORT_ERROR", ModuleNotFoundError("No module named 'triton'", name="triton"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not scan._wants_triton("auto", *cuda_input)
    assert not kernels.has_failed("triton")
    monkeypatch.setattr(scan_triton, "_IMPORT_ERROR", ImportError("libcuda.so.1: cannot open shared object file"))
    with pytest.warns(RuntimeWarning, match="triton is installed but does not import: .*libcuda.so.1"):
        assert not scan._wants_triton("auto", *cuda_input)
    assert not scan._wants_triton("auto", *cuda_input)  # said once
    assert kernels.has_failed("triton") and "libcuda" in kernels.what_ran()
