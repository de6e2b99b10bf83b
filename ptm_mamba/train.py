"""The train stage: masked-token training of PTM-Mamba on ``accelerate``.

Set-up, restore, the loop (step, periodic validation, checkpoints), then the test set scored
with ``best.ckpt``. One CPU, one GPU or several processes; only the main process writes files.

Outputs in ``{output_dir}/ptm-mamba-{run_name}/``: :data:`ptm_mamba.layout.RUN_FILES` and
``logs/`` for ``training.log_with``. ``resume/state.ckpt`` lets a killed run continue exactly; it
is not a Snakemake output, so it survives Snakemake's clean-up of an interrupted job.
A "step" is an optimiser step: ``training.gradient_accumulation_steps`` batches on each process.
"""

from __future__ import annotations

import contextlib
import itertools
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
from .device import choose_device, config_gpu_requests, describe, summary
from .embedding_store import EmbeddingReader, check_store_ids, check_store_settings
from .errors import PipelineError, StopRequested, one_line
from .fileio import atomic_write_json, atomic_write_text
from .guard import refuse_files_in_the_way
from .layout import (BEST_CKPT, CONFIG_FILE, LAST_CKPT, METRICS_FILE, RESUME_DIR, SPLIT_MAPPING,
                     run_dir as run_folder, split_store_path, timestamp_run_name)
from .forward import SUM_FIELDS, batch_sums, forward_batch, rates
from .model import ModelConfig, PTMMamba
from .provenance import write_provenance
from .settings import Settings
from .kernels import what_ran
from .split import load_split_dir, mapping, split_fingerprint, split_from_config
from .stages import TRAIN, fingerprint_of, stage_settings
from .tokenizer import PTM_MARKER_ID, VOCAB

log = logging.getLogger(__name__)



def processes(settings: Settings):
    """The processes of this run (accelerate's state). On the CPU, accelerate forms a process
    group (gloo) only when told cpu=True; else every launched process would train alone."""
    from accelerate import PartialState

    device = choose_device(settings.device, config_gpu_requests(settings), "train")
    return PartialState(cpu=device.type == "cpu")


def make_accelerator(settings: Settings, out: Path):
    """The Accelerator; experiment trackers (training.log_with) write under ``{out}/logs/``."""
    from accelerate import Accelerator
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import DistributedDataParallelKwargs

    tr = settings.training
    cpu = processes(settings).device.type == "cpu"
    precision = tr.mixed_precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and cpu:  # accelerate would quietly train in fp32 under the fp16 label
        raise PipelineError('training.mixed_precision: fp16 needs a GPU (accelerate runs fp16 on CUDA only); '
                            'on CPU use bf16 or "no"')
    tracker = None if tr.log_with == "none" else tr.log_with
    if tracker is not None and tracker not in {str(t) for t in get_available_trackers()}:
        raise PipelineError(f"training.log_with: {tracker} is not installed (pip install {tracker}), "
                            f"or set training.log_with: none")
    # Without ESM the esm_head takes no part in the loss; DDP must be told.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not tr.use_esm)
    return Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], cpu=cpu, log_with=tracker,
                       project_dir=str(out / "logs"))


def run_dir(settings: Settings, run_name: str | None) -> Path:
    """The run's output folder, decided once by the main process (a timestamp when unnamed)."""
    from accelerate.utils import broadcast_object_list

    name = [run_name or settings.run_name or timestamp_run_name()]
    if processes(settings).num_processes > 1:
        broadcast_object_list(name, from_process=0)
    out = run_folder(settings.training.output_dir, name[0])
    refuse_files_in_the_way({"training.output_dir": out})
    return out


def load_splits(settings: Settings, split_dir: str | None) -> dict:
    """The split stage's files (checked), or (standalone) the same split made in memory."""
    if split_dir is None:
        return split_from_config(settings)
    return load_split_dir(split_dir, settings)


def open_store(settings: Settings, name: str, proteins) -> EmbeddingReader:
    """A split's precomputed embeddings, checked against the split and the embed-stage settings."""
    path = split_store_path(settings.training.embeddings_dir, name)
    if not path.exists():
        raise PipelineError(f"{path} not found: run the embed stage first (ptm-mamba embed --config ... "
                            f"--output_dir {path.parent}) or set training.use_precomputed_embeddings: false")
    check_store_settings(path, settings)
    store = EmbeddingReader(path)
    if store.attrs.get("split_fingerprint") != split_fingerprint(proteins):
        raise PipelineError(f"{path}: made for another {name} split than {name}.csv holds; "
                            "the embeddings are stale, rerun the embed stage")
    check_store_ids(store, proteins)  # each id on its own protein's rows (swapped/reordered ids or rows)
    return store


def make_builders(settings: Settings, splits: dict, esm_model) -> dict[str, BatchBuilder]:
    tr = settings.training
    return {
        name: BatchBuilder(
            proteins, max_sequence_length=settings.dataset.max_sequence_length, mask_prob=tr.mask_prob,
            random_mask_only_prob=tr.random_mask_only_prob,
            store=open_store(settings, name, proteins) if tr.precomputed else None,
            esm_alphabet=esm_model.alphabet if esm_model is not None else None)
        for name, proteins in splits.items()
    }


def load_esm_on_the_fly(settings: Settings, device):
    if not settings.training.use_esm or settings.training.precomputed:
        return None
    if settings.dataset.max_residues > 1022:
        raise PipelineError("dataset.max_sequence_length must be <= 1024 when ESM-2 runs on the fly "
                            "(ESM-2 reads at most 1022 residues); precompute embeddings instead")
    from .esm import load_esm_of

    return load_esm_of(settings, device=device)


def esm_dim(builders: dict, esm_model) -> int:
    if esm_model is not None:
        return esm_model.embed_dim
    store = builders["train"].store
    return int(store.attrs["dim"]) if store is not None else ModelConfig.esm_dim


def model_config(settings: Settings, dim: int) -> ModelConfig:
    """The model's config: ``settings.model``, ``training.use_esm`` and ESM-2's width ``dim``."""
    m = settings.model
    return ModelConfig(model_type=m.model_type, d_model=m.d_model, n_layer=m.n_layer, esm_dim=dim,
                       use_esm=settings.training.use_esm, ssm_cfg=dict(m.ssm_cfg), scan=m.scan)


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


def resume_fingerprint(settings: Settings, world_size: int) -> str:
    """What must match for a saved state to be continued: the stage's settings, the process
    count and the checkpoint resumed from (a state is continued only by a run begun there)."""
    source = settings.training.resume_from_checkpoint
    return fingerprint_of({**stage_settings(settings, TRAIN), "world_size": world_size,
                           **({"resume_from_checkpoint": str(source)} if source is not None else {})})


class StopSignals:
    """On SIGTERM/SIGUSR1 (SLURM) and SIGINT, save the state after the current step and stop; a
    second SIGINT stops at once."""

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



def backward_batch(model, batch: Batch, accelerator, esm_model, *, scale: float, sync: bool) -> torch.Tensor:
    """Forward and backward of one batch (loss times ``scale``); gradients all-reduced only when ``sync``."""
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



THROUGHPUT_FIELDS = ("tokens_per_s", "loader_wait_fraction", "peak_memory_gib")


def without_throughput(records: list[dict]) -> list[dict]:
    """metrics.json records without the machine's :data:`THROUGHPUT_FIELDS`: what a rerun reproduces exactly."""
    return [{k: v for k, v in r.items() if k not in THROUGHPUT_FIELDS} for r in records]


class Throughput:
    """Whether training is fed: per optimiser step, wall time, time blocked in the loader's
    ``next()`` (includes assembly when ``num_workers`` is 0) and peak GPU memory. A step's time
    runs from the end of the previous step (after its validation and checkpoints)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.restart()

    def restart(self) -> None:
        self.started, self.waited = time.perf_counter(), 0.0

    def timed(self, items):
        items = iter(items)
        while True:
            began = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - began
            yield item

    def local(self) -> list[float]:
        """Seconds waited and peak GPU memory in bytes (0 on the CPU)."""
        cuda = self.device.type == "cuda"
        return [self.waited, float(torch.cuda.max_memory_allocated(self.device)) if cuda else 0.0]

    def fields(self, tokens: int, ranks: torch.Tensor) -> dict:
        """A step's :data:`THROUGHPUT_FIELDS`: the longest wait of any process (the others wait for
        it at the all-reduce) and the largest memory (null on the CPU)."""
        seconds = time.perf_counter() - self.started
        waited, peak = ranks.amax(0).tolist()
        return {"tokens_per_s": tokens / seconds, "loader_wait_fraction": min(1.0, waited / seconds),
                "peak_memory_gib": peak / 2**30 if self.device.type == "cuda" else None}


def throughput_line(steps: list[dict]) -> str:
    """Log text for ``steps``: tokens/s, wall-time-weighted waiting fraction, peak memory."""
    seconds = [r["tokens"] / r["tokens_per_s"] for r in steps]  # each step's wall time
    wait = sum(r["loader_wait_fraction"] * s for r, s in zip(steps, seconds)) / sum(seconds)
    peaks = [r["peak_memory_gib"] for r in steps if r["peak_memory_gib"] is not None]
    return (f"train {sum(r['tokens'] for r in steps) / sum(seconds):,.0f} tokens/s, {wait:.0%} of it waiting "
            f"for data" + (f", peak GPU memory {max(peaks):.2f} GiB" if peaks else ""))


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


class TrainData:
    """The splits as this process sees them, training batches cut into optimiser steps."""

    def __init__(self, settings: Settings, split_dir: str | None, accelerator):
        tr = settings.training
        self.settings = settings
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.splits = load_splits(settings, split_dir)
        self.esm_model = load_esm_on_the_fly(settings, accelerator.device)
        self.builders = make_builders(settings, self.splits, self.esm_model)
        # items are whole batches; pinned host memory lets the copy to the GPU overlap compute
        self.loader_args = dict(batch_size=None, collate_fn=collate_single, num_workers=tr.num_workers,
                                pin_memory=accelerator.device.type == "cuda")
        self.eval_loaders = {}
        for name in ("val", "test"):
            batches = plan_batches(self.builders[name].lengths, tr.max_tokens_per_batch,
                                   tr.per_device_train_batch_size)
            self.eval_loaders[name] = torch.utils.data.DataLoader(
                EvalBatches(self.builders[name], batches, self.rank, self.world), **self.loader_args)
        # A step is `accum` batches per process, process n taking batches n, n + world, ...:
        # 1 process x 2 batches is 2 processes x 1 batch.
        self.accum = tr.gradient_accumulation_steps
        self.batches_per_epoch = len(self.plan(0)) // self.world
        self.total_steps = self.batches_per_epoch // self.accum * tr.num_train_epochs
        if tr.max_steps is not None:
            self.total_steps = min(self.total_steps, tr.max_steps)

    def plan(self, epoch: int) -> list[list[int]]:
        tr = self.settings.training
        return epoch_batches(self.builders["train"].lengths, tr.max_tokens_per_batch,
                             tr.per_device_train_batch_size, seed=self.settings.seed, epoch=epoch,
                             world_size=self.world * self.accum)

    def steps(self, epoch: int, start: int):
        """This process's steps of ``epoch`` from batch ``start``, each an iterator over its batches."""
        loader = torch.utils.data.DataLoader(
            EpochBatches(self.builders["train"], self.plan(epoch), seed=self.settings.seed, epoch=epoch,
                         replicate=epoch % self.settings.embedding.mask_replicates, rank=self.rank,
                         world_size=self.world, start=start),
            **self.loader_args)
        batches = iter(loader)
        for _ in range(len(loader) // self.accum):  # every process has a multiple of accum (split_evenly)
            yield itertools.islice(batches, self.accum)


class Run:
    """One training run (model, optimiser, schedule, ``position``, ``metrics``, best weights), on every process."""

    def __init__(self, settings: Settings, accelerator, data: TrainData, out: Path):
        tr = settings.training
        self.settings, self.accelerator, self.data, self.out = settings, accelerator, data, out
        self.main = accelerator.is_main_process
        self.state_path = out / RESUME_DIR / "state.ckpt"
        self.fingerprint = resume_fingerprint(settings, accelerator.num_processes)
        torch.manual_seed(settings.seed)  # the same init on every process
        self.mcfg = model_config(settings, esm_dim(data.builders, data.esm_model))
        self.model = PTMMamba(self.mcfg)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(tr.weight_decay), lr=tr.lr, betas=tr.adam_betas)
        # The scheduler stays outside accelerate, which would step it once per process per step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, warmup=tr.warmup_steps, total=data.total_steps, schedule=tr.lr_schedule, min_ratio=tr.min_lr_ratio))
        self.position = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_val_loss": math.inf}
        max_residues = settings.dataset.max_residues
        self.metrics: list[dict] = [{
            "split_sizes": {name: len(p) for name, p in data.splits.items()},
            "longer_than_max_sequence_length": {
                name: sum(p.length > max_residues for p in ps) for name, ps in data.splits.items()},
            "num_parameters": self.model.num_parameters()}]
        self.best_weights: dict | None = None  # the best validation's model: best.ckpt can always be written
        self.throughput = Throughput(accelerator.device)


    def model_state(self, weights: dict) -> dict:
        """What best.ckpt holds: a model's weights, its config and the run's config and settings."""
        check_finite_weights(weights, f"step {self.position['step']}")
        return {"format_version": checkpoint.FORMAT_VERSION, "model": weights, "model_config": self.mcfg.to_dict(),
                "config": self.settings.as_dict(), "settings": stage_settings(self.settings, TRAIN),
                "vocab": list(VOCAB)}

    def checkpoint_state(self) -> dict:
        """What last.ckpt and resume/state.ckpt hold."""
        return {**self.model_state(self.accelerator.unwrap_model(self.model).state_dict()),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "position": dict(self.position), "metrics": self.metrics, "best_model": self.best_weights,
                "fingerprint": self.fingerprint}

    def restore(self) -> None:
        """Start from the run's own state, else resume_from_checkpoint, else init_from, else fresh."""
        tr = self.settings.training
        own = self.own_state()
        if own is not None:
            self.load(own, self.state_path)
        elif tr.resume_from_checkpoint is not None:
            source = tr.resume_from_checkpoint
            try:
                saved = checkpoint.load(source)
            except PipelineError as exc:
                raise PipelineError(f"training.resume_from_checkpoint: {exc}") from None
            if "optimizer" not in saved:
                raise PipelineError(f"training.resume_from_checkpoint: {source} holds weights only (a best.ckpt), "
                                    f"nothing to continue: resume from a last.ckpt, or set training.init_from "
                                    f"to start a new run from these weights")
            self.load(saved, source)
        elif tr.init_from is not None:
            load_initial_weights(self.model, tr.init_from)
            self.accelerator.print(f"initialised from {tr.init_from} (weights only)")

    def own_state(self) -> dict | None:
        """This run's resume/state.ckpt, if one was written with these settings (else a warning)."""
        if not self.state_path.exists():
            return None
        saved = checkpoint.load(self.state_path)
        if saved.get("fingerprint") != self.fingerprint:
            if self.main:
                log.warning("ignoring %s: it was written with other settings", self.state_path)
            return None
        return saved

    def load(self, saved: dict, source) -> None:
        """Continue from a last.ckpt or resume state: weights, optimiser, schedule, position, metrics."""
        checkpoint.load_weights(self.model, saved["model"], source)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise PipelineError(f"{source}: its optimiser state does not fit this model "
                                f"({one_line(exc)})") from None
        self.scheduler.load_state_dict(saved["scheduler"])
        self.follow_schedule()
        self.position = saved["position"]
        self.metrics = saved["metrics"]
        self.best_weights = saved.get("best_model")
        self.accelerator.print(f"resumed from {source} at step {self.position['step']}")

    def follow_schedule(self) -> None:
        """Set the lr to this run's schedule at the loaded step (another run's last.ckpt may have had
        another max_steps)."""
        sched = self.scheduler
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() reads

    def save_progress(self) -> None:
        if self.main:
            checkpoint.save(self.checkpoint_state(), self.state_path)
            atomic_write_json(self.out / METRICS_FILE, self.metrics)
        self.accelerator.wait_for_everyone()


    def start(self) -> None:
        accelerator, data, out = self.accelerator, self.data, self.out
        self.model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / CONFIG_FILE, dump_config(self.settings.as_dict()))
            atomic_write_json(out / SPLIT_MAPPING, mapping(data.splits))
            write_provenance(self.settings, out, self.runtime())
        accelerator.init_trackers("ptm-mamba", init_kwargs={"wandb": {"name": out.name},
                                                            "mlflow": {"run_name": out.name}})
        sizes, world = self.metrics[0]["split_sizes"], data.world
        accelerator.print(f"{self.mcfg.model_type}: {accelerator.unwrap_model(self.model).num_parameters():,} "
                          f"parameters on {world} process{'es' if world > 1 else ''}; "
                          f"train {sizes['train']} / val {sizes['val']} / test {sizes['test']} proteins; "
                          f"{data.batches_per_epoch} batches per epoch per process, {world * data.accum} per "
                          f"optimiser step, {data.total_steps} steps; model.scan {self.mcfg.scan}")
        accelerator.print(f"device {summary(describe(accelerator.device))}; precision {accelerator.mixed_precision}")

    def runtime(self) -> dict:
        """What runs where, for provenance.json."""
        return {**describe(self.accelerator.device), "precision": self.accelerator.mixed_precision,
                "kernels": what_ran()}

    def finish(self) -> None:
        """last.ckpt, best.ckpt from the best validation's weights, then the test set scored with them."""
        accelerator, out = self.accelerator, self.out
        if self.best_weights is None:  # resumed from a last.ckpt of an earlier version, which kept no best weights
            self.best_weights = checkpoint.load(out / BEST_CKPT)["model"]
        if self.main:
            checkpoint.save(self.checkpoint_state(), out / LAST_CKPT)
            checkpoint.save(self.model_state(self.best_weights), out / BEST_CKPT)
        accelerator.wait_for_everyone()
        best_model = PTMMamba(self.mcfg).to(accelerator.device)
        best_model.load_state_dict(self.best_weights)
        avg, records = evaluate(best_model, self.data.eval_loaders["test"], accelerator, self.data.esm_model, "test",
                                self.position["epoch"], self.position["step"], per_type=True)
        self.metrics.extend(records)
        self.add_record(avg)
        accelerator.print(f"test (best.ckpt): loss {avg['avg_test_loss']:.4f} acc {avg['avg_test_acc']:.4f} "
                          f"PTM acc {avg['avg_test_ptm_acc']:.4f}")
        if self.main:
            write_provenance(self.settings, out, self.runtime())  # now with the kernels that ran
            atomic_write_json(out / METRICS_FILE, self.metrics)
            self.state_path.unlink(missing_ok=True)
            if self.state_path.parent.exists() and not any(self.state_path.parent.iterdir()):
                self.state_path.parent.rmdir()
        accelerator.wait_for_everyone()
        accelerator.end_training()


    def backward_step(self, batches, signals: StopSignals) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """One step's forward and backward; one all-reduce carries the :data:`SUM_FIELDS`, any stop
        signal and each process's :meth:`Throughput.local` (its own row)."""
        accum, device = self.data.accum, self.accelerator.device
        pending = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=device)
        for number, batch in enumerate(batches, start=1):  # gradients are all-reduced after the last one
            pending += backward_batch(self.model, batch.to(device), self.accelerator, self.data.esm_model,
                                      scale=1 / accum, sync=number == accum)
        flag = torch.tensor([float(signals.received or 0)], dtype=torch.float64, device=device)
        ranks = torch.zeros((self.data.world, 2), dtype=torch.float64, device=device)
        ranks[self.data.rank] = torch.tensor(self.throughput.local(), dtype=torch.float64, device=device)
        shared = self.accelerator.reduce(torch.cat([pending, flag, ranks.flatten()]), reduction="sum")
        n = len(SUM_FIELDS)
        return shared[:n], int(shared[n]) != 0, shared[n + 1:].view(-1, 2)

    def optimizer_step(self, sums: torch.Tensor, ranks: torch.Tensor) -> dict:
        """The optimiser step (refused on a NaN/Inf loss); returns its record."""
        tr, step = self.settings.training, self.position["step"] + 1
        if not math.isfinite(float(sums[0])):
            raise PipelineError(
                f"step {step}: the training loss is {float(sums[0]):.4g} (NaN/Inf); "
                f"stopped before the optimiser step, no checkpoint of it written (lower training.lr, "
                f"check the embeddings, or set training.mixed_precision: \"no\")")
        if tr.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        try:
            self.optimizer.step()
        except RuntimeError as exc:  # Adam's step size no longer fits the parameters' dtype
            if "overflow" not in str(exc):
                raise
            raise PipelineError(f"training.lr: {tr.lr!r} overflows the optimiser's step size "
                                f"at step {step}; use a smaller learning rate") from None
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position["step"] = step
        self.position["batch_in_epoch"] += self.data.accum
        tokens = int(sums[SUM_FIELDS.index("tokens")])
        record = {"Epoch": self.position["epoch"], "Step": step, **rates(sums, "train"), "lr": lr,
                  "tokens": tokens, **self.throughput.fields(tokens, ranks)}
        self.add_record(record)
        return record

    def next_epoch(self) -> None:
        self.position["epoch"] += 1
        self.position["batch_in_epoch"] = 0

    def validate(self) -> None:
        """Score the validation split; a better loss than any before makes best.ckpt."""
        epoch, step = self.position["epoch"], self.position["step"]
        since_last = [r for r in itertools.takewhile(lambda r: "avg_val_loss" not in r, reversed(self.metrics))
                      if "tokens_per_s" in r]  # the step records (of this version) since the last validation
        avg, records = evaluate(self.model, self.data.eval_loaders["val"], self.accelerator, self.data.esm_model,
                                "val", epoch, step)
        self.metrics.extend(records)
        self.add_record(avg)
        self.accelerator.print(f"epoch {epoch} step {step}: val loss {avg['avg_val_loss']:.4f} "
                               f"acc {avg['avg_val_acc']:.4f} PTM acc {avg['avg_val_ptm_acc']:.4f}; "
                               f"{throughput_line(since_last)}; kernels: {what_ran()}")
        if avg["avg_val_loss"] < self.position["best_val_loss"]:
            self.position["best_val_loss"] = avg["avg_val_loss"]
            self.best_weights = cpu_copy(self.accelerator.unwrap_model(self.model).state_dict())
            if self.main:
                checkpoint.save(self.model_state(self.best_weights), self.out / BEST_CKPT)

    def add_record(self, entry: dict) -> None:
        """Add a record to metrics.json (the source of truth) and its scalars to the trackers."""
        self.metrics.append(entry)
        self.accelerator.log({k: v for k, v in entry.items() if k != "Step" and isinstance(v, (int, float))},
                             step=entry["Step"])


class ProgressLines:
    """Without a progress bar (a log file): a line every ``EVERY_S`` seconds, so training is seen to move."""

    EVERY_S = 30.0

    def __init__(self, run: Run):
        self.run, self.every, self.first = run, self.EVERY_S, run.position["step"]
        self.started = self.last = time.perf_counter()

    def step(self, record: dict) -> None:
        now = time.perf_counter()
        if not self.run.main or now - self.last < self.every:
            return
        self.last = now
        done, total = self.run.position["step"], self.run.data.total_steps
        rate = (done - self.first) / (now - self.started)
        left = (total - done) / rate if rate > 0 else float("inf")
        self.run.accelerator.print(f"step {done}/{total} ({100 * done / total:.0f}%): loss {record['train_loss']:.4f}, "
                                   f"{record['tokens_per_s']:,.0f} tokens/s, {_duration(left)} left", flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def train_loop(run: Run, signals: StopSignals, *, progress: bool) -> None:
    """Steps from the run's position to the last, validating every ``log_steps``. A stop signal
    saves the state and raises :class:`StopRequested`, except at the last step (the run finishes).
    """
    data, log_steps, total = run.data, run.settings.training.log_steps, run.data.total_steps
    tokens_seen, started, pace = 0.0, time.perf_counter(), run.throughput
    lines = ProgressLines(run) if not progress else None
    run.model.train()
    with tqdm(total=total, initial=run.position["step"], disable=not (progress and run.main), unit="step",
              dynamic_ncols=True) as bar:
        pace.restart()
        while run.position["step"] < total:
            for batches in pace.timed(data.steps(run.position["epoch"], start=run.position["batch_in_epoch"])):
                sums, stop, ranks = run.backward_step(pace.timed(batches), signals)
                record = run.optimizer_step(sums, ranks)
                tokens_seen += record["tokens"]
                bar.update(1)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                tok_s=f"{tokens_seen / (time.perf_counter() - started):.0f}")
                if lines:
                    lines.step(record)
                step = run.position["step"]
                if step == total:
                    run.validate()
                    return
                if step % log_steps == 0:
                    run.validate()
                if step % log_steps == 0 or stop:
                    run.save_progress()
                if stop:
                    raise StopRequested(int(signals.received or signal.SIGTERM), step, run.state_path)
                pace.restart()
            run.next_epoch()


def train(settings: Settings, *, split_dir: str | None = None, run_name: str | None = None,
          progress: bool = True) -> Path:
    """Train PTM-Mamba as ``settings`` say; returns the run's output folder.

    Stops with :class:`StopRequested` (state saved) on SIGTERM/SIGUSR1/SIGINT; calling it again
    continues exactly. A signal during set-up stops after the first step.
    """
    with StopSignals() as signals:
        return _train(settings, signals, split_dir=split_dir, run_name=run_name, progress=progress)


def _train(settings: Settings, signals: StopSignals, *, split_dir: str | None, run_name: str | None,
           progress: bool) -> Path:
    out = run_dir(settings, run_name)
    accelerator = make_accelerator(settings, out)
    data = TrainData(settings, split_dir, accelerator)
    run = Run(settings, accelerator, data, out)
    run.restore()
    run.start()
    train_loop(run, signals, progress=progress)
    run.finish()
    return out
