"""The ``ptm-mamba`` command line: one subcommand per pipeline stage.

Each Snakemake rule is a thin call of one of these; each also runs on its own. A
:class:`PipelineError` ends the command with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from .config import load_config, schema_default
from .errors import PipelineError, StopRequested
from .layout import SPLITS
from .options import option
from .settings import Settings


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline config YAML (see config/config.yaml)")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_config(load_config(args.config))


def _reads(args: argparse.Namespace, settings: Settings | None = None, **options) -> dict:
    """Every file a command reads, by the option or config key that names it."""
    from .guard import config_inputs

    found = {"--config": args.config} if getattr(args, "config", None) else {}
    found.update(config_inputs(settings) if settings is not None else {})
    for name, value in options.items():
        paths = value if isinstance(value, (list, tuple)) else [value]
        found.update({f"--{name}" + (f" ({p})" if len(paths) > 1 else ""): p for p in paths if p})
    return found


def _split_unit(split_dir) -> list:
    """The split stage's files in ``split_dir`` (read together as one unit)."""
    from .layout import split_paths

    return list(split_paths(split_dir).values()) if split_dir else []


def cmd_split(args: argparse.Namespace) -> None:
    from .split import run_split
    from .guard import refuse_overwrite
    from .layout import split_paths

    settings = _settings(args)
    if args.clusters and not settings.dataset.by_cluster:
        raise PipelineError("--clusters is read only with dataset.split_by: cluster")
    writes = {f"--output_dir ({path.name})": path for path in split_paths(args.output_dir).values()}
    refuse_overwrite(writes, _reads(args, settings, clusters=args.clusters))
    summary = run_split(settings, args.output_dir, clusters_file=args.clusters, threads=args.threads)
    for name, s in summary["splits"].items():
        clusters = f" in {s['clusters']} clusters" if "clusters" in s else ""
        print(f"{name}: {s['sequences']} sequences{clusters}, {s['residues']} residues, {s['ptm_sites']} PTM sites, "
              f"longest {s['max_length']}")
    dup = summary["duplicates"]
    print(f"{dup['groups']} groups of duplicate sequences ({dup['proteins']} proteins), each kept in one split")
    if "clusters" in summary:
        near = summary["clusters"]["test_vs_train"]
        best = "no alignment" if near["max_identity"] is None else f"highest identity {near['max_identity']}"
        print(f"test vs train: {best} over >= {near['coverage']} of both ({near['searched']} of {near['of']} "
              "test proteins searched with mmseqs)")


def cmd_cluster(args: argparse.Namespace) -> None:
    from collections import Counter

    from .cluster import run_cluster
    from .guard import refuse_overwrite

    settings = _settings(args)
    refuse_overwrite({"--output": args.output}, _reads(args, settings))
    clusters = run_cluster(settings, args.output, threads=args.threads)
    sizes = sorted(Counter(clusters.values()).values(), reverse=True)
    print(f"{len(clusters)} proteins in {len(sizes)} clusters (largest {sizes[0]}, {sizes.count(1)} singletons) "
          f"-> {args.output}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from .layout import prepared_summary_path
    from .prepare import prepare, report_lines
    from .guard import refuse_overwrite

    summary_path = prepared_summary_path(args.output)
    refuse_overwrite({"--output": args.output, "its summary": summary_path}, _reads(args, input=args.input))
    summary = prepare(args.format, args.input, args.output)
    print("\n".join(report_lines(summary)))
    print(f"-> {args.output} (summary: {summary_path})")


def cmd_embed_shard(args: argparse.Namespace) -> None:
    from .embed import embed_shard
    from .guard import refuse_overwrite

    settings = _settings(args)
    refuse_overwrite({"--output": args.output},
                     _reads(args, settings, split_file=args.split_file, split_unit=_split_unit(Path(args.split_file).parent)))
    n = embed_shard(settings, args.split, args.shard, args.num_shards, args.split_file, args.output)
    print(f"{args.split} shard {args.shard}/{args.num_shards}: {n} proteins -> {args.output}")


def cmd_gather(args: argparse.Namespace) -> None:
    from .embed import gather_split
    from .guard import refuse_overwrite

    settings = _settings(args)
    refuse_overwrite({"--output": args.output}, _reads(args, settings, split_file=args.split_file, shards=args.shards))
    gather_split(settings, args.split, args.split_file, args.shards, args.output)
    print(f"{args.split}: {len(args.shards)} shards -> {args.output}")


def cmd_embed(args: argparse.Namespace) -> None:
    from .distributed import process_group
    from .embed import embed_all
    from .split import run_split
    from .guard import refuse_overwrite
    from .layout import shard_path, split_store_path

    settings = _settings(args)
    split_dir = args.split_dir or f"{args.output_dir}/split"
    n = settings.embedding.shards
    writes = [split_store_path(args.output_dir, s) for s in SPLITS]
    writes += [shard_path(args.output_dir, s, i, n) for s in SPLITS for i in range(n)]
    writes += [] if args.split_dir else _split_unit(split_dir)
    refuse_overwrite({f"--output_dir ({w})": w for w in writes},
                     _reads(args, settings, split_dir=_split_unit(args.split_dir)))
    with process_group() as (rank, world_size, barrier):
        if rank == 0 and not args.split_dir:
            run_split(settings, split_dir)
        barrier()
        embed_all(settings, split_dir, args.output_dir, batch_size=args.batch_size,
                  rank=rank, world_size=world_size, barrier=barrier)


def cmd_train(args: argparse.Namespace) -> None:
    from .config import validate
    from .train import train
    from .guard import check_run_owner, refuse_overwrite
    from .layout import run_dir, split_store_path
    from .config import settings_of_run

    # with runs: (a sweep), --run_name names the run, trained with its overrides
    settings = settings_of_run(load_config(args.config), args.run_name, source=f"{args.config} (--run_name)")
    if args.run_name is not None:  # the schema's rule for run_name (a plain folder name) holds here too
        validate({**settings.as_dict(), "run_name": args.run_name}, source="--run_name")
    name = args.run_name or settings.run_name  # none: a new folder named by the time
    stores = [split_store_path(settings.training.embeddings_dir, s) for s in SPLITS]
    reads = _reads(args, settings, split_dir=_split_unit(args.split_dir), embeddings=stores)
    if name is not None:
        out = run_dir(settings.training.output_dir, name)
        refuse_overwrite({}, reads, folders={"the run folder": out})
        check_run_owner(settings, out)
    out = train(settings, split_dir=args.split_dir, run_name=args.run_name,
                progress=not args.no_progress)
    print(f"outputs in {out}")


def cmd_predict(args: argparse.Namespace) -> None:
    from .config import schema_entry
    from .predict import write_predictions

    least = schema_entry("predict.max_tokens_per_batch")["minimum"]  # the config key's bound
    if args.max_tokens_per_batch < least:
        raise PipelineError(f"--max_tokens_per_batch: {args.max_tokens_per_batch} is less than the minimum "
                            f"of {least}")

    n = write_predictions(args.checkpoint, args.input, args.output, device=args.device,
                          max_tokens_per_batch=args.max_tokens_per_batch, pooled=args.pooled,
                          progress=not args.no_progress)
    print(f"{n} proteins -> {args.output}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import run_evaluate
    from .guard import refuse_overwrite
    from .layout import BEST_CKPT, SPLIT_MAPPING, evaluation_outputs, run_dir
    from .config import settings_of_run

    # with runs: (a sweep), --run_name names the run, evaluated with its settings
    settings = settings_of_run(load_config(args.config), args.run_name, source=f"{args.config} (--run_name)")
    name = args.run_name or settings.run_name
    if name is None:
        raise PipelineError("evaluate: give --run_name (the config names no run_name)")
    folder = run_dir(settings.training.output_dir, name)
    reads = _reads(args, settings, split_dir=_split_unit(args.split_dir), clusters=args.clusters)
    reads.update({f"the run's {BEST_CKPT}": folder / BEST_CKPT, f"the run's {SPLIT_MAPPING}": folder / SPLIT_MAPPING})
    refuse_overwrite({f"--output_dir ({path.name})": path for path in evaluation_outputs(args.output_dir).values()},
                     reads)
    record = run_evaluate(settings, name, args.split_dir, args.output_dir, clusters_file=args.clusters,
                          device=args.device, progress=not args.no_progress)
    print(f"{len(record['tasks'])} PTM types evaluated, {len(record['skipped'])} left out -> {args.output_dir}")


def cmd_doctor(args: argparse.Namespace) -> None:
    import json

    from .doctor import as_json, doctor, report

    findings = doctor()
    print(json.dumps(as_json(findings), indent=2) if args.json else report(findings))
    if any(f.status == "problem" for f in findings):
        raise SystemExit(1)


def cmd_import_original(args: argparse.Namespace) -> None:
    from .esm_weights import weight_files
    from .guard import refuse_overwrite
    from .original import ORIGINAL_ESM, import_original

    esm_model = args.esm_model or ORIGINAL_ESM
    esm = {f"--esm_model ({f.name})": f for f in weight_files(esm_model)}
    refuse_overwrite({"--output": args.output}, _reads(args, checkpoint=args.checkpoint) | esm)

    summary = import_original(args.checkpoint, args.output, esm_model=esm_model,
                              esm_repr_layer=args.esm_repr_layer)
    m = summary["model_config"]
    print(f"{m['model_type']} d_model {m['d_model']} n_layer {m['n_layer']} esm_dim {m['esm_dim']}: "
          f"{summary['kept']} tensors kept, {len(summary['dropped'])} unused *_b mixer tensors dropped "
          f"-> {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptm-mamba", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("split", help="validate the dataset and split it into train/val/test")
    _add_config(p)
    option(p, "output_dir", required=True, help="folder for train/val/test.csv, split_mapping.json, summary.json")
    p.add_argument("--clusters", default=None, help="with dataset.split_by: cluster, the cluster stage's "
                   "clusters.tsv (without it the clusters are made here)")
    p.add_argument("--threads", type=int, default=None, help="mmseqs threads (default: all cores)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("cluster", help="MMseqs2 sequence clusters of the dataset, for dataset.split_by: cluster")
    _add_config(p)
    p.add_argument("--output", required=True, help="clusters.tsv to write")
    p.add_argument("--threads", type=int, default=None, help="mmseqs threads (default: all cores)")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("prepare", help="build the dataset CSV (unique_id,ptm_seq) from UniProt or PTM-Mamba data")
    p.add_argument("--format", required=True, choices=["uniprot_tsv", "ptm_mamba_sites"],
                   help="uniprot_tsv: UniProtKB TSV export; ptm_mamba_sites: the original's per-site table")
    p.add_argument("--input", required=True, help="the source file (.gz read as gzip)")
    p.add_argument("--output", required=True, help="the CSV to write (NAME.summary.json lands beside it)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("embed", help="ESM-2 embeddings of all three splits in one command (under "
                       "accelerate launch the processes share the shards)")
    _add_config(p)
    option(p, "output_dir", required=True, help="embeddings folder ({split}_embeddings.h5 land here)")
    option(p, "batch_size", type=int, default=None, help="cap on sequences per ESM batch")
    option(p, "split_dir", default=None,
         help="use the split stage's folder; without it the data is split as the split stage would")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("embed-shard", help="ESM-2 embeddings of one shard of one split (one Snakemake job)")
    _add_config(p)
    p.add_argument("--split", required=True, choices=SPLITS)
    option(p, "split_file", required=True, help="the split stage's {split}.csv")
    p.add_argument("--shard", type=int, required=True, help="shard index, 0-based")
    option(p, "num_shards", type=int, required=True)
    p.add_argument("--output", required=True, help="the shard's .h5 file")
    p.set_defaults(func=cmd_embed_shard)

    p = sub.add_parser("gather", help="validate a split's shards and join them into {split}_embeddings.h5")
    _add_config(p)
    p.add_argument("--split", required=True, choices=SPLITS)
    option(p, "split_file", required=True)
    p.add_argument("--shards", nargs="+", required=True, help="the split's shard files, in order")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_gather)

    p = sub.add_parser("train", help="train PTM-Mamba (run it under accelerate launch for several GPUs)")
    _add_config(p)
    option(p, "split_dir", default=None,
         help="the split stage's folder; without it the data is split as the split stage would")
    option(p, "run_name", default=None, help="outputs go to {training.output_dir}/ptm-mamba-{run_name} "
         "(default: the config's run_name, else a timestamp); with the config's runs: (a sweep), the run "
         "to train, with its overrides")
    option(p, "no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="per-residue hidden states of a trained model for a CSV/FASTA, to HDF5")
    p.add_argument("--checkpoint", required=True, help="best.ckpt or last.ckpt of a training run")
    p.add_argument("--input", required=True, help="CSV (unique_id, ptm_seq) or FASTA with PTM tokens")
    p.add_argument("--output", required=True, help="HDF5 file (embedding-store layout)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: a GPU if torch can use one; a job given GPUs "
                   "by SLURM or CUDA_VISIBLE_DEVICES that cannot use one stops)")
    option(p, "max_tokens_per_batch", type=int, default=schema_default("predict.max_tokens_per_batch"),
           help="token budget of one batch (default: %(default)s, the config's predict.max_tokens_per_batch)")
    p.add_argument("--pooled", action=argparse.BooleanOptionalAction, default=schema_default("predict.pooled"),
                   help="also store each protein's mean hidden state over its residues (dataset 'pooled', "
                   "row i for id i; read with ptm_mamba.predict.read_pooled); default: %(default)s")
    option(p, "no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="PTM-site prediction on a run's test split: linear probes on its hidden "
                       "states, its ESM-2 alone and a one-hot window (AUROC, AUPRC, bootstrap intervals)")
    _add_config(p)
    option(p, "run_name", default=None, help="the run: {training.output_dir}/ptm-mamba-{run_name}/best.ckpt "
           "(default: the config's run_name)")
    option(p, "split_dir", required=True, help="the split stage's folder the run was trained on (its test.csv)")
    p.add_argument("--clusters", default=None, help="with dataset.split_by: cluster, the cluster stage's "
                   "clusters.tsv: proteins of one cluster stay in one fold")
    option(p, "output_dir", required=True, help="folder for ptm_sites.tsv, .json, .png and .html")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the config's device)")
    option(p, "no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("import-original", help="convert a checkpoint of the original PTM-Mamba code "
                       "({'model', 'config'}) into this format")
    p.add_argument("--checkpoint", required=True, help="the original's best.ckpt/last.ckpt (or the published one)")
    p.add_argument("--output", required=True, help="the checkpoint to write (for predict, or to fine-tune from)")
    option(p, "esm_model", default=None,
         help="the ESM-2 the model is run with, as esm.model takes it (default: the original's)")
    option(p, "esm_repr_layer", type=int, default=None, help="its layer (default: the last, as the original)")
    p.set_defaults(func=cmd_import_original)

    p = sub.add_parser("doctor", help="what this machine offers the pipeline (torch, driver, GPUs, Triton, "
                       "mamba-ssm, nvcc, MMseqs2, SLURM, what auto picks), with a fix for each problem; "
                       "exit 1 when a problem is found")
    p.add_argument("--json", action="store_true", help="the findings as JSON")
    p.set_defaults(func=cmd_doctor)

    from .report import add_parser as add_plots_parser

    add_plots_parser(sub)
    from .compare import add_parser as add_compare_parser

    add_compare_parser(sub)
    return parser


def pipeline_error_message(exc: PipelineError) -> str:
    """The error's message; a DataLoader worker's error arrives wrapped with the worker's
    traceback ("Caught PipelineError in DataLoader worker process 0. Original Traceback ..."),
    whose last line holds the message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


class _Stderr(logging.StreamHandler):
    """A log handler writing to the current ``sys.stderr``: ``main`` may run more than once in a
    process (the tests), with another ``sys.stderr`` each time."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the stream is always sys.stderr
        pass


def _log_to_stderr() -> None:
    """``logging.basicConfig(level=WARNING, stream=sys.stderr)``, once per process, even where the
    root logger has handlers already (where basicConfig does nothing)."""
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    logging.getLogger("ptm_mamba").setLevel(logging.INFO)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except PipelineError as exc:
        print(f"error: {pipeline_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system refused: a path under a file, no permission, disk full ...
        from .fileio import os_error_line  # one line; a full disk or quota with the free space there

        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except StopRequested as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 128 + exc.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
