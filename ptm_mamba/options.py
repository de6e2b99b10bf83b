"""Command-line options spelled both ways, for the CLI and the subcommands other modules add."""

from __future__ import annotations

import argparse


def option(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """An option spelled both ``--output_dir`` (as the README and the rules write it) and ``--output-dir``."""
    dashed = name.replace("_", "-")
    flags = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
    p.add_argument(*flags, dest=name, **kw)
