"""The train stage: masked-token training of PTM-Mamba on ``accelerate``.

Reads top to bottom: set-up (processes, output folder, data, model,
optimiser), resume, the loop (train step, periodic validation, checkpoints),
then the test set scored with ``best.ckpt``. Runs on one CPU, one GPU, or
several processes (``accelerate launch``/``torchrun``); only the main process
writes files.

Outputs in ``{output_dir}/ptm-mamba-{run_name}/``: ``config.yaml``,
``split_mapping.json``, ``metrics.json``, ``best.ckpt``, ``last.ckpt`` (and
``logs/`` when ``training.log_with`` names a tracker: every metrics.json step
record's scalars, at its step); while running, ``resume/state.ckpt`` holds
everything needed to continue exactly where a killed run stopped (it is not a
Snakemake output, so it survives Snakemake's clean-up of an interrupted job).

A "step" is an optimiser step: ``training.gradient_accumulation_steps`` batches
on each process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .batching import epoch_batches, plan_batches
from .config import dump_config
from .data import Batch, BatchBuilder, EpochBatches, EvalBatches, collate_single
from .embed import check_store_settings, split_store_path
from .embedding_store import EmbeddingReader
from .errors import PipelineError, StopRequested
from .fileio import atomic_write_json, atomic_write_text
from .forward import SUM_FIELDS, batch_sums, forward_batch, rates
from .model import ModelConfig, PTMMamba
from .provenance import write_provenance
from .scan import what_ran
from .split import load_split_dir, mapping, split_fingerprint, split_from_config
from .stages import TRAIN, fingerprint_of, stage_settings
from .tokenizer import PTM_MARKER_ID, VOCAB

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- set-up

def processes():
    """The processes of this run (accelerate's state, which the Accelerator made later shares).

    Without a GPU, accelerate forms a process group (gloo) only when told cpu=True; else every
    process launched by torchrun/accelerate would train alone.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(config: dict, out: Path):
    """The Accelerator; experiment trackers (training.log_with) write under ``{out}/logs/``."""
    from accelerate import Accelerator
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import DistributedDataParallelKwargs

    tr = config["training"]
    precision = tr["mixed_precision"]
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    tracker = None if tr["log_with"] == "none" else tr["log_with"]
    if tracker is not None and tracker not in {str(t) for t in get_available_trackers()}:
        raise PipelineError(f"training.log_with: {tracker} is not installed (pip install {tracker}), "
                            f"or set training.log_with: none")
    # Without ESM the esm_head takes no part in the loss; DDP must be told.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not tr["use_esm"])
    return Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], cpu=processes().device.type == "cpu",
                       log_with=tracker, project_dir=str(out / "logs"))


def run_dir(config: dict, run_name: str | None) -> Path:
    """The run's output folder, decided once by the main process (a timestamp when unnamed)."""
    from accelerate.utils import broadcast_object_list

    name = [run_name or config["run_name"] or dt.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")]
    if processes().num_processes > 1:
        broadcast_object_list(name, from_process=0)
    out = Path(config["training"]["output_dir"]) / f"ptm-mamba-{name[0]}"
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise PipelineError(f"{folder} is a file, not a folder: training writes its outputs into {out}/")
    return out


def load_splits(config: dict, split_dir: str | None) -> dict:
    """The split stage's files (checked), or (standalone) the same split made in memory."""
    if split_dir is None:
        return split_from_config(config)
    return load_split_dir(split_dir, config)


def open_store(config: dict, name: str, proteins) -> EmbeddingReader:
    """A split's precomputed embeddings, checked against the split and the embed-stage settings."""
    path = split_store_path(config["training"]["embeddings_dir"], name)
    if not path.exists():
        raise PipelineError(f"{path} not found: run the embed stage first (ptm-mamba embed --config ... "
                            f"--output_dir {path.parent}) or set training.use_precomputed_embeddings: false")
    check_store_settings(path, config)
    store = EmbeddingReader(path)
    if store.attrs.get("split_fingerprint") != split_fingerprint(proteins):
        raise PipelineError(f"{path}: made for another {name} split than {name}.csv holds; "
                            "the embeddings are stale, rerun the embed stage")
    return store


def make_builders(config: dict, splits: dict, esm_model) -> dict[str, BatchBuilder]:
    tr = config["training"]
    precomputed = tr["use_esm"] and tr["use_precomputed_embeddings"]
    return {
        name: BatchBuilder(
            proteins, max_sequence_length=config["dataset"]["max_sequence_length"], mask_prob=tr["mask_prob"],
            random_mask_only_prob=tr["random_mask_only_prob"],
            store=open_store(config, name, proteins) if precomputed else None,
            esm_alphabet=esm_model.alphabet if esm_model is not None else None)
        for name, proteins in splits.items()
    }


def load_esm_on_the_fly(config: dict, device):
    tr = config["training"]
    if not tr["use_esm"] or tr["use_precomputed_embeddings"]:
        return None
    if config["dataset"]["max_sequence_length"] - 2 > 1022:
        raise PipelineError("dataset.max_sequence_length must be <= 1024 when ESM-2 runs on the fly "
                            "(ESM-2 reads at most 1022 residues); precompute embeddings instead")
    from .embed import load_esm_for

    return load_esm_for(config, device=device)


def esm_dim(config: dict, builders: dict, esm_model) -> int:
    if esm_model is not None:
        return esm_model.embed_dim
    store = builders["train"].store
    return int(store.attrs["dim"]) if store is not None else ModelConfig.esm_dim


def model_config(config: dict, dim: int) -> ModelConfig:
    m = config["model"]
    return ModelConfig(model_type=m["model_type"], d_model=m["d_model"], n_layer=m["n_layer"],
                       esm_dim=dim, use_esm=config["training"]["use_esm"], ssm_cfg=dict(m["ssm_cfg"]),
                       scan=m["scan"])


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): warm-up, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resume_fingerprint(config: dict, world_size: int) -> str:
    """What must match for a saved state to be continued exactly: the train stage's settings
    (see ``stages.DEPENDS_ON``) and the number of processes."""
    return fingerprint_of({**stage_settings(config, TRAIN), "world_size": world_size})


class StopSignals:
    """Catch SIGTERM (SLURM's time limit or preemption, a kill), SIGUSR1 (SLURM's ``--signal``)
    and SIGINT (Ctrl-C) during training: the run saves its state at the end of the current step
    and stops. A second SIGINT stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- one step, one evaluation

def backward_batch(model, batch: Batch, accelerator, esm_model, *, scale: float, sync: bool) -> torch.Tensor:
    """Forward and backward of one training batch, its mean loss times ``scale`` (1 / the batches
    per optimiser step); gradients are all-reduced across processes only when ``sync`` (the step's
    last batch). Returns the batch's :data:`SUM_FIELDS`."""
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        with accelerator.autocast():
            logits = forward_batch(model, batch, esm_model).logits
        loss, sums = batch_sums(logits, batch)
        accelerator.backward(loss * scale)
    return sums


@torch.no_grad()
def evaluate(model, loader, accelerator, esm_model, prefix: str, epoch: int, step: int,
             per_type: bool = False) -> tuple[dict, list[dict]]:
    """Score a whole split (each process its share); returns the average record and per-batch records."""
    from accelerate.utils import gather_object

    net = accelerator.unwrap_model(model)
    net.eval()
    total = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=accelerator.device)
    by_type = torch.zeros((2, len(VOCAB)), dtype=torch.float64, device=accelerator.device)
    records = []
    for number, batch in zip(loader.dataset.numbers, loader):
        batch = batch.to(accelerator.device)
        with accelerator.autocast():
            logits = forward_batch(net, batch, esm_model).logits
        _, sums = batch_sums(logits, batch)
        total += sums
        records.append({"Epoch": epoch, "Step": step, "batch": number, **rates(sums, prefix)})
        if per_type:
            target = batch.labels[batch.pred_mask]
            hit = (logits[batch.pred_mask].argmax(-1) == target).double()
            by_type[0].index_add_(0, target, torch.ones_like(hit))
            by_type[1].index_add_(0, target, hit)
    net.train()
    total = accelerator.reduce(total, reduction="sum")
    records = sorted(gather_object(records), key=lambda r: r["batch"])
    avg = {"Epoch": epoch, "Step": step, **{f"avg_{k}": v for k, v in rates(total, prefix).items()}}
    if per_type:
        by_type = accelerator.reduce(by_type, reduction="sum").tolist()
        avg[f"{prefix}_ptm_acc_by_type"] = {
            VOCAB[t]: {"sites": int(by_type[0][t]), "acc": by_type[1][t] / by_type[0][t]}
            for t in range(PTM_MARKER_ID + 1, len(VOCAB)) if by_type[0][t] > 0}
    return avg, records


# ----------------------------------------------------------------------------- the run

def cpu_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def load_initial_weights(model: PTMMamba, path: str) -> None:
    """training.init_from: start from a checkpoint's weights (only), refused in one line."""
    try:
        checkpoint.load_weights(model, checkpoint.load(path)["model"], path)
    except PipelineError as exc:
        raise PipelineError(f"training.init_from: {exc}") from None


def check_finite_weights(weights: dict, what: str) -> None:
    """Never write a checkpoint with NaN/Inf weights (it would pass for a trained model)."""
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise PipelineError(f"{what}: weight {bad} is NaN/Inf; no checkpoint written")


def train(config: dict, *, split_dir: str | None = None, run_name: str | None = None,
          progress: bool = True) -> Path:
    """Train PTM-Mamba as ``config`` says; returns the run's output folder.

    Stops with :class:`StopRequested` (state saved at the current step) on SIGTERM/SIGUSR1/SIGINT;
    calling it again continues exactly where it stopped. The signals are caught from the start: one
    that arrives while the run sets up stops it after its first step, one during the final test is
    let finish the run.
    """
    with StopSignals() as signals:
        return _train(config, signals, split_dir=split_dir, run_name=run_name, progress=progress)


def _train(config: dict, signals: StopSignals, *, split_dir: str | None, run_name: str | None,
           progress: bool) -> Path:
    tr = config["training"]
    out = run_dir(config, run_name)
    accelerator = make_accelerator(config, out)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    state_path = out / "resume" / "state.ckpt"

    # --- data
    splits = load_splits(config, split_dir)
    esm_model = load_esm_on_the_fly(config, accelerator.device)
    builders = make_builders(config, splits, esm_model)
    # items are whole batches; pinned host memory lets the copy to the GPU overlap compute
    loader_args = dict(batch_size=None, collate_fn=collate_single, num_workers=tr["num_workers"],
                       pin_memory=accelerator.device.type == "cuda")
    eval_batches = {name: plan_batches(builders[name].lengths, tr["max_tokens_per_batch"],
                                       tr["per_device_train_batch_size"]) for name in ("val", "test")}
    eval_loaders = {name: torch.utils.data.DataLoader(
        EvalBatches(builders[name], eval_batches[name], rank, world),
        **loader_args) for name in ("val", "test")}
    # An optimiser step takes `accum` batches on each process: world * accum batches of the epoch's
    # plan (batches n, n + world, ... on process n): 1 process x 2 batches is 2 processes x 1 batch.
    accum = tr["gradient_accumulation_steps"]

    def plan(epoch: int) -> list[list[int]]:
        return epoch_batches(builders["train"].lengths, tr["max_tokens_per_batch"], tr["per_device_train_batch_size"],
                             seed=config["seed"], epoch=epoch, world_size=world * accum)

    batches_per_epoch = len(plan(0)) // world
    total_steps = batches_per_epoch // accum * tr["num_train_epochs"]
    if tr["max_steps"] is not None:
        total_steps = min(total_steps, tr["max_steps"])

    # --- model and optimiser (the same init on every process)
    torch.manual_seed(config["seed"])
    mcfg = model_config(config, esm_dim(config, builders, esm_model))
    model = PTMMamba(mcfg)
    optimizer = torch.optim.AdamW(model.param_groups(tr["weight_decay"]), lr=tr["lr"],
                                  betas=tuple(tr["adam_betas"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup=tr["warmup_steps"], total=total_steps, schedule=tr["lr_schedule"],
        min_ratio=tr["min_lr_ratio"]))

    # --- resume: an explicit checkpoint, or this run's own interrupted state; else training.init_from's weights
    position = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_val_loss": math.inf}
    best_weights: dict | None = None  # the best validation's model, kept so that best.ckpt can always be written
    max_residues = config["dataset"]["max_sequence_length"] - 2
    metrics: list[dict] = [{"split_sizes": {name: len(p) for name, p in splits.items()},
                            "longer_than_max_sequence_length": {
                                name: sum(p.length > max_residues for p in ps) for name, ps in splits.items()},
                            "num_parameters": model.num_parameters()}]
    fp = resume_fingerprint(config, world)
    source, saved = tr["resume_from_checkpoint"], None
    if source is None and state_path.exists():
        saved = checkpoint.load(state_path)
        if saved.get("fingerprint") == fp:
            source = state_path
        else:
            saved = None
            if main:
                log.warning("ignoring %s: it was written with other settings", state_path)
    if source is not None:
        saved = saved or checkpoint.load(source)
        checkpoint.load_weights(model, saved["model"], source)
        if "optimizer" in saved:
            try:
                optimizer.load_state_dict(saved["optimizer"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise PipelineError(f"{source}: its optimiser state does not fit this model "
                                    f"({checkpoint.one_line(str(exc))})") from None
            scheduler.load_state_dict(saved["scheduler"])
            position = saved["position"]
            metrics = saved["metrics"]
            best_weights = saved.get("best_model")
        accelerator.print(f"resumed from {source} at step {position['step']}")
    elif tr["init_from"] is not None:
        load_initial_weights(model, tr["init_from"])
        accelerator.print(f"initialised from {tr['init_from']} (weights only)")

    # The scheduler stays outside accelerate, which would step it once per process per step.
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(config))
        atomic_write_json(out / "split_mapping.json", mapping(splits))
        write_provenance(config, out)
    accelerator.init_trackers("ptm-mamba", init_kwargs={"wandb": {"name": out.name}, "mlflow": {"run_name": out.name}})
    sizes = metrics[0]["split_sizes"]
    accelerator.print(f"{mcfg.model_type}: {accelerator.unwrap_model(model).num_parameters():,} parameters on "
                      f"{world} process{'es' if world > 1 else ''}; "
                      f"train {sizes['train']} / val {sizes['val']} / test {sizes['test']} proteins; "
                      f"{batches_per_epoch} batches per epoch per process, {world * accum} per optimiser step, "
                      f"{total_steps} steps; model.scan {mcfg.scan}")

    def model_state(weights: dict) -> dict:
        check_finite_weights(weights, f"step {position['step']}")
        return {"format_version": checkpoint.FORMAT_VERSION, "model": weights, "model_config": mcfg.to_dict(),
                "config": config, "settings": stage_settings(config, TRAIN), "vocab": list(VOCAB)}

    def full_state() -> dict:
        return {**model_state(accelerator.unwrap_model(model).state_dict()), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "position": dict(position), "metrics": metrics,
                "best_model": best_weights, "fingerprint": fp}

    def add_record(entry: dict) -> None:
        """Add a step's record to metrics.json (the source of truth) and its scalars to the trackers."""
        metrics.append(entry)
        accelerator.log({k: v for k, v in entry.items() if k != "Step" and isinstance(v, (int, float))},
                        step=entry["Step"])

    def validate(epoch: int, step: int) -> None:
        nonlocal best_weights
        avg, records = evaluate(model, eval_loaders["val"], accelerator, esm_model, "val", epoch, step)
        metrics.extend(records)
        add_record(avg)
        accelerator.print(f"epoch {epoch} step {step}: val loss {avg['avg_val_loss']:.4f} "
                          f"acc {avg['avg_val_acc']:.4f} PTM acc {avg['avg_val_ptm_acc']:.4f}; kernels: {what_ran()}")
        if avg["avg_val_loss"] < position["best_val_loss"]:
            position["best_val_loss"] = avg["avg_val_loss"]
            best_weights = cpu_copy(accelerator.unwrap_model(model).state_dict())
            if main:
                checkpoint.save(model_state(best_weights), out / "best.ckpt")

    def save_progress() -> None:
        if main:
            checkpoint.save(full_state(), state_path)
            atomic_write_json(out / "metrics.json", metrics)
        accelerator.wait_for_everyone()

    # --- the loop
    bar = tqdm(total=total_steps, initial=position["step"], disable=not (progress and main), unit="step",
               dynamic_ncols=True)
    tokens_seen, started = 0.0, time.perf_counter()
    model.train()
    while position["step"] < total_steps:
        epoch = position["epoch"]
        batches = plan(epoch)
        replicate = epoch % config["embedding"]["mask_replicates"]
        loader = torch.utils.data.DataLoader(
            EpochBatches(builders["train"], batches, seed=config["seed"], epoch=epoch, replicate=replicate,
                         rank=rank, world_size=world, start=position["batch_in_epoch"]),
            **loader_args)
        pending = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=accelerator.device)
        for number, batch in enumerate(loader, start=1):
            pending += backward_batch(model, batch.to(accelerator.device), accelerator, esm_model,
                                      scale=1 / accum, sync=number % accum == 0)
            if number % accum:  # the optimiser steps after the step's last batch
                continue
            # one reduction carries the step's sums and any process's stop request
            flag = torch.tensor([float(signals.received or 0)], dtype=torch.float64, device=pending.device)
            shared = accelerator.reduce(torch.cat([pending, flag]), reduction="sum")
            sums, stop = shared[:-1], int(shared[-1]) != 0
            pending.zero_()
            if not math.isfinite(float(sums[0])):
                raise PipelineError(
                    f"step {position['step'] + 1}: the training loss is {float(sums[0]):.4g} (NaN/Inf); "
                    f"stopped before the optimiser step, no checkpoint of it written (lower training.lr, "
                    f"check the embeddings, or set training.mixed_precision: \"no\")")
            if tr["grad_clip"] is not None:
                accelerator.clip_grad_norm_(model.parameters(), tr["grad_clip"])
            lr = scheduler.get_last_lr()[0]
            try:
                optimizer.step()
            except RuntimeError as exc:  # Adam's step size no longer fits the parameters' dtype
                if "overflow" not in str(exc):
                    raise
                raise PipelineError(f"training.lr: {tr['lr']!r} overflows the optimiser's step size "
                                    f"at step {position['step'] + 1}; use a smaller learning rate") from None
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position["step"] += 1
            position["batch_in_epoch"] += accum
            step = position["step"]
            record = {"Epoch": epoch, "Step": step, **rates(sums, "train"), "lr": lr,
                      "tokens": int(sums[SUM_FIELDS.index("tokens")])}
            add_record(record)
            tokens_seen += record["tokens"]
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                            tok_s=f"{tokens_seen / (time.perf_counter() - started):.0f}")
            if step % tr["log_steps"] == 0 or step == total_steps:
                validate(epoch, step)
                if step == total_steps:
                    break
                save_progress()
            if stop:
                save_progress()
                raise StopRequested(int(signals.received or signal.SIGTERM), step, state_path)
            if step >= total_steps:
                break
        else:  # the epoch ran to its end
            position["epoch"] += 1
            position["batch_in_epoch"] = 0
    bar.close()

    # --- last.ckpt, best.ckpt from the best validation's weights, then the test set scored with them
    if best_weights is None:  # resumed from a last.ckpt of an earlier version, which kept no best weights
        best_weights = checkpoint.load(out / "best.ckpt")["model"]
    if main:
        checkpoint.save(full_state(), out / "last.ckpt")
        checkpoint.save(model_state(best_weights), out / "best.ckpt")
    accelerator.wait_for_everyone()
    best_model = PTMMamba(mcfg).to(accelerator.device)
    best_model.load_state_dict(best_weights)
    avg, records = evaluate(best_model, eval_loaders["test"], accelerator, esm_model, "test",
                            position["epoch"], position["step"], per_type=True)
    metrics.extend(records)
    add_record(avg)
    accelerator.print(f"test (best.ckpt): loss {avg['avg_test_loss']:.4f} acc {avg['avg_test_acc']:.4f} "
                      f"PTM acc {avg['avg_test_ptm_acc']:.4f}")
    if main:
        atomic_write_json(out / "metrics.json", metrics)
        state_path.unlink(missing_ok=True)
        if state_path.parent.exists() and not any(state_path.parent.iterdir()):
            state_path.parent.rmdir()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out
