"""The ``ptm-mamba`` command line: one subcommand per pipeline stage.

Each Snakemake rule is a thin call of one of these; every one also runs on its
own (``ptm-mamba split --config config/config.yaml --output_dir results/split``).
A :class:`PipelineError` ends the command with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import PipelineError


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline config YAML (see config/config.yaml)")


def _opt(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """An option spelled both ``--output_dir`` (the seed's) and ``--output-dir``."""
    dashed = name.replace("_", "-")
    flags = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
    p.add_argument(*flags, dest=name, **kw)


def cmd_split(args: argparse.Namespace) -> None:
    from .config import load_config
    from .split import run_split

    config = load_config(args.config)
    summary = run_split(config, args.output_dir)
    for name, s in summary.items():
        print(f"{name}: {s['sequences']} sequences, {s['residues']} residues, {s['ptm_sites']} PTM sites, "
              f"{s['longer_than_max_sequence_length']} longer than max_sequence_length")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptm-mamba", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("split", help="validate the dataset and split it into train/val/test")
    _add_config(p)
    _opt(p, "output_dir", required=True, help="folder for train/val/test.csv, split_mapping.json, summary.json")
    p.set_defaults(func=cmd_split)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
