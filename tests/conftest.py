"""Shared fixtures: small datasets and configs written to tmp folders, and the real CLI."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

# The suite runs in two pytest-xdist workers (pyproject.toml's addopts): one torch thread each, so
# that the two share the 2 cores of a laptop or CI machine instead of fighting over them; alone
# (`-n 0`), torch takes both.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
os.environ.setdefault("OMP_NUM_THREADS", "1" if WORKER else "2")

# Without a GPU the Triton scan kernels run under Triton's interpreter (tests/test_scan_triton.py).
# Triton picks compiled or interpreted when a kernel is decorated, i.e. when `ptm_mamba.scan` is
# first imported by any test module, so the switch is set here, before all of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


SLURM_SCRIPTS = REPO / "scripts" / "slurm"


def slurm_installed() -> bool:
    return shutil.which("slurmctld") is not None or Path("/usr/sbin/slurmctld").exists()


def _slurm_runs() -> bool:
    return subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0


def pytest_configure(config):
    """Start the local single-node SLURM in the process that runs the session (pytest itself, or
    xdist's controller before its workers start), where it is installed and we are root, unless it
    runs already. It is left running at the end (`bash scripts/slurm/stop.sh` stops it): another
    pytest session may be using it, and starting it again costs the next session ~10 s.

    Every `snakemake` command loads the SLURM executor plugin, which asks `scontrol show config` for
    its defaults; with SLURM installed but not running, each command then waits ~10 s for the
    controller. With it running the question takes milliseconds."""
    if WORKER or not slurm_installed() or os.geteuid() != 0 or _slurm_runs():
        return
    started = subprocess.run(["bash", str(SLURM_SCRIPTS / "start.sh")], capture_output=True, text=True,
                             timeout=180)
    if started.returncode != 0:
        raise pytest.UsageError(f"scripts/slurm/start.sh failed: {started.stderr.strip()}")


# The longest tests, by name: each starts a worker's queue (xdist hands each worker a contiguous half of
# the collection, then lets an idle worker take the tail of the other's), so that they overlap instead of
# ending the run one after the other.
_LONGEST = ("test_dag_on_slurm_with_a_train_job_past_its_time_limit",
            "test_other_invocations_and_kills_during_a_run_change_nothing")


def pytest_collection_modifyitems(config, items):
    workers = getattr(config.option, "numprocesses", None) or 0
    first = [i for i in items if i.name == _LONGEST[0]]
    second = [i for i in items if i.name == _LONGEST[1]]
    if workers != 2 or len(first) != 1 or len(second) != 1:
        return
    # the second's module (tests/test_workflow.py) stays together behind it: its module fixture runs once
    module = [i for i in items if i.module is second[0].module and i is not second[0]]
    rest = [i for i in items if i is not first[0] and i.module is not second[0].module]
    half = len(items) // 2
    head = first + rest[:half - 1]
    items[:] = head + second + module + rest[half - 1:]


@pytest.fixture(scope="session")
def local_slurm() -> bool:
    """Whether the local SLURM runs (see :func:`pytest_configure`)."""
    return slurm_installed() and os.geteuid() == 0 and _slurm_runs()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            own_process: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m ptm_mamba ARGS`` as a user would; capture its output.

    By default ``ptm_mamba.cli.main`` runs in this process (no ~3 s interpreter and torch start-up)
    as it would in its own: stdout and stderr captured, ``cwd`` the current directory, the exit
    status of ``SystemExit`` (argparse errors, ``--help``) or of an uncaught exception (1, with its
    traceback on stderr), Python's default warning filters with warnings printed to stderr, and
    the process state a stage may change put back afterwards (see :func:`_as_its_own_process`).
    ``timeout`` then goes unenforced (pytest-timeout still ends a test that hangs).

    ``own_process=True`` runs a real ``python -m ptm_mamba``: for a command to be killed or
    signalled, one that depends on a fresh interpreter (import-time settings, environment variables
    read at import), or to prove that the installed command works end to end."""
    command = [sys.executable, "-m", "ptm_mamba", *map(str, args)]
    if own_process:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    from ptm_mamba import cli

    out, err = io.StringIO(), io.StringIO()
    with _chdir(os.getcwd() if cwd is None else cwd), _as_its_own_process(command[2:]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = _exit_status(cli.main(command[3:]))
        except SystemExit as exc:
            status = _exit_status(exc.code)
        except Exception:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(command, status, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _chdir(path):
    """contextlib.chdir (Python 3.11+; the package supports 3.10)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _exit_status(code) -> int:
    """The exit status of ``sys.exit(code)``: None is 0, an int is itself, anything else is printed
    to stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# The default warning filters of a fresh `python` (release build, no -W, no PYTHONWARNINGS).
_PYTHON_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                           ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                           ("ignore", ResourceWarning, "")]
_TORCH_DEFAULT_SEED = 67280421310721  # torch.initial_seed() of a fresh interpreter


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning on stderr as the interpreter does (not into pytest's record of warnings)."""
    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _as_its_own_process(argv: list[str]):
    """Process-wide state as a fresh ``python -m ptm_mamba ARGV`` has it, and as it was again after:
    sys.argv, os.environ, torch's thread count, RNG, grad mode, default dtype and deterministic
    flags, Python's and NumPy's RNGs, signal handlers, the root and ``ptm_mamba`` loggers, warning
    filters, accelerate's shared state and the record of the kernels run, `ptm_mamba.kernels` (the
    current directory is `_chdir`'s)."""
    import logging
    import random
    import signal
    import threading

    import numpy as np

    from ptm_mamba import kernels

    saved_argv, saved_env = sys.argv, dict(os.environ)
    threads, grad, dtype = torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    rng = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in signal.valid_signals()} if main_thread else {}
    root, package = logging.getLogger(), logging.getLogger("ptm_mamba")
    logs = root.handlers[:], root.level, package.level
    accelerate = _swap_accelerate_state({})

    sys.argv = [str(REPO / "ptm_mamba" / "__main__.py"), *argv[1:]]
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(_TORCH_DEFAULT_SEED)
    record = kernels.reset()
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in _PYTHON_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module, append=True)
            warnings.showwarning = _show_warning
            yield
    finally:
        sys.argv = saved_argv
        if dict(os.environ) != saved_env:
            os.environ.clear()
            os.environ.update(saved_env)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])
        for sig, handler in handlers.items():
            if handler is not None and signal.getsignal(sig) != handler:
                signal.signal(sig, handler)
        root.handlers[:] = logs[0]
        root.setLevel(logs[1])
        package.setLevel(logs[2])
        kernels.reset(record)
        _swap_accelerate_state(accelerate)


def _swap_accelerate_state(state: dict) -> dict:
    """Put ``state`` (class name -> shared state) in place of accelerate's process-wide state (what
    the first Accelerator of a process fixes, e.g. its mixed precision); return what was there."""
    module = sys.modules.get("accelerate.state")
    if module is None:
        return {}
    old = {}
    for name in ("PartialState", "AcceleratorState", "GradientState"):
        shared = getattr(module, name)._shared_state
        old[name] = dict(shared)
        shared.clear()
        shared.update(state.get(name, {}))
    return old


def error_line(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """A refusal as the CLI must give it: exit ``code``, no traceback, exactly one stderr line
    ``error: ...`` holding every one of ``needles``; returns that line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_config(path: Path, **sections) -> Path:
    """Write a config YAML whose sections are given as dicts."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def write_csv(path: Path, rows: list[tuple[str, str]], header=("unique_id", "ptm_seq")) -> Path:
    lines = [",".join(header)] + [",".join(f'"{c}"' if "," in c else c for c in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def toy_rows(n: int = 20) -> list[tuple[str, str]]:
    """A few valid proteins with PTM tokens, deterministic."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(n):
        body = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(20, 60)))
        rows.append((f"P{i:03d}", "M<N-acetylalanine>" + body[:10] + "<Phosphoserine>" + body[10:]))
    return rows


@pytest.fixture
def toy_config(tmp_path: Path) -> Path:
    data = write_csv(tmp_path / "data.csv", toy_rows())
    return write_config(tmp_path / "config.yaml",
                        dataset={"dataset_location": str(data), "val_size": 3, "test_size": 3})


DEMO = REPO / "datasets" / "demo.csv"


def demo_subset(path: Path, n: int, max_len: int = 400) -> Path:
    """The first ``n`` demo proteins of at most ``max_len`` characters, as a CSV."""
    lines = DEMO.read_text().splitlines()
    rows = [line for line in lines[1:] if len(line) < max_len][:n]
    path.write_text("\n".join([lines[0], *rows]) + "\n")
    return path


def tiny_config(root: Path, *, n: int = 60, **sections) -> dict:
    """A complete tiny config rooted at ``root`` (data, tiny ESM-2, outputs), as a dict."""
    from ptm_mamba.config import validate
    from ptm_mamba.testing import write_tiny_esm2_checkpoint

    esm_path = root / "esm" / "esm2_t2_tiny.pt"
    if not esm_path.exists():
        write_tiny_esm2_checkpoint(esm_path, num_layers=2, embed_dim=16, attention_heads=2)
    config = {
        "run_name": "tiny",
        "dataset": {"dataset_location": str(demo_subset(root / "data.csv", n)), "val_size": 8, "test_size": 8},
        "esm": {"model": str(esm_path)},
        "embedding": {"shards": 2, "mask_replicates": 2, "max_tokens_per_batch": 4000},
        "training": {"embeddings_dir": str(root / "embeddings"), "output_dir": str(root / "outputs"),
                     "max_steps": 6, "log_steps": 3, "per_device_train_batch_size": 8,
                     "max_tokens_per_batch": 3000, "warmup_steps": 2, "lr": 3e-3},
        "model": {"d_model": 16, "n_layer": 1, "ssm_cfg": {"d_state": 4}},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return validate(config, source="tiny config")


def settings_for(config: dict):
    """The typed settings (:class:`ptm_mamba.settings.Settings`) of a config dict, as the stages take
    them: validated with the schema's defaults filled, on a copy (``config`` stays as it is)."""
    import copy

    from ptm_mamba.config import validate
    from ptm_mamba.settings import Settings

    return Settings.from_config(validate(copy.deepcopy(config), source="test config"))


@pytest.fixture(scope="session")
def embedded_project(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny dataset split and embedded once per test session (split dir, config)."""
    from ptm_mamba.embed import embed_all
    from ptm_mamba.split import run_split

    root = tmp_path_factory.mktemp("embedded")
    config = tiny_config(root)
    run_split(settings_for(config), root / "split")
    embed_all(settings_for(config), root / "split", root / "embeddings")
    write_config(root / "config.yaml", **config)
    return root, config


# Two PTM sequences for inference tests (10 and 8 residues).
SEQS = {"a": "MK<Phosphoserine>LLVRRAS", "b": "M<N-acetylalanine>KN<N-linked (GlcNAc...) asparagine>GTW"}


@pytest.fixture(scope="session")
def checkpoint(embedded_project, tmp_path_factory) -> Path:
    """best.ckpt of a 2-step training run on the embedded project (through the real CLI)."""
    root, config = embedded_project
    cfg = dict(config, run_name="trained")
    cfg["training"] = dict(config["training"], max_steps=2, log_steps=2)
    path = write_config(tmp_path_factory.mktemp("trained") / "c.yaml", **cfg)
    result = run_cli("train", "--config", path, "--split_dir", root / "split", "--no_progress")
    assert result.returncode == 0, result.stderr
    from ptm_mamba.layout import BEST_CKPT, run_dir

    return run_dir(root / "outputs", "trained") / BEST_CKPT
