"""This process's record of the kernels it ran: which ran, which failed (and are not tried again), and
on which devices the Triton kernels passed their check before first use (`ptm_mamba.scan.triton_agrees`).

"torch" is the PyTorch scan, "triton" the Triton scan (`ptm_mamba.scan_triton`), "fused" mamba-ssm's
fused block (`ptm_mamba.mamba_block`). A kernel that fails warns once (`fall_back`) and the process
keeps to the PyTorch path from then on. `what_ran()` is the line logs and run records show;
`reset()` starts a fresh record (tests; a command run in the test process as its own).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ptm_mamba.errors import one_line

_LABELS = {"triton": "the Triton selective scan", "fused": "mamba-ssm's fused Mamba kernels"}


@dataclass
class Record:
    ran: dict[str, None] = field(default_factory=dict)  # in the order of first use
    failed: dict[str, str] = field(default_factory=dict)  # name -> why
    checked: set[str] = field(default_factory=set)  # devices on which the Triton kernels passed their check


_record = Record()


def reset(record: Record | None = None) -> Record:
    """Start a fresh record, or put back one an earlier call returned; returns the record replaced."""
    global _record
    old, _record = _record, (record if record is not None else Record())
    return old


def note_ran(name: str) -> None:
    _record.ran.setdefault(name)


def has_failed(name: str) -> bool:
    return name in _record.failed


def passed_check(device: str) -> bool:
    """Whether the Triton kernels passed their check on `device` (str(torch.device)) in this process."""
    return device in _record.checked


def note_passed_check(device: str) -> None:
    _record.checked.add(device)


def what_ran() -> str:
    """One line, e.g. "triton", "fused", or "torch (triton failed: RuntimeError: ...)"; "nothing yet"
    before the first scan."""
    ran = ", ".join(_record.ran) or "nothing yet"
    failed = "; ".join(f"{name} failed: {why}" for name, why in _record.failed.items())
    return f"{ran} ({failed})" if failed else ran


def describe(exc: BaseException) -> str:
    """An exception as "Type: message" on one line."""
    return f"{type(exc).__name__}: {one_line(exc)}"


def fall_back(name: str, why: str | BaseException) -> None:
    """Record that `name` ("triton" or "fused") cannot run in this process; the first time, warn (one line)."""
    if has_failed(name):
        return
    _record.failed[name] = why if isinstance(why, str) else describe(why)
    warnings.warn(f"{_LABELS[name]} failed ({_record.failed[name]}); using the PyTorch path in this process from now on",
                  RuntimeWarning, stacklevel=3)  # fmt: skip


@contextlib.contextmanager
def falling_back(name: str) -> Iterator[None]:
    """Run the block; an exception in it (a kernel that does not compile or launch) means `fall_back(name)`
    and is swallowed, so the code after the block takes the PyTorch path. Out of memory is not the
    kernels' fault, and the PyTorch path needs more: it is raised."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the compiler, driver or extension raises
        fall_back(name, exc)
