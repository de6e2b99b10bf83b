"""Process-group helpers for commands that may run under ``accelerate launch``/``torchrun``."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int, Callable[[], None]]]:
    """Yield ``(rank, world_size, barrier)``; a single process when not launched distributed.

    Under a launcher (``WORLD_SIZE`` > 1) a gloo group is made for CPU
    coordination only (barriers); the work itself needs no collectives.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield 0, 1, lambda: None
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), dist.barrier
    finally:
        if created:
            dist.destroy_process_group()
