"""Training features: gradient accumulation, experiment tracking, initialising from a checkpoint.

- ``training.gradient_accumulation_steps``: 1 process x 2 batches per optimiser step trains as
  2 processes x 1 (same metrics to float tolerance); a stop signal that arrives between the two
  batches of a step stops after that step, and the resumed run ends exactly as an uninterrupted one;
- ``training.log_with: tensorboard``: the metrics.json step records are in the event files, at
  their steps, also across a resume;
- ``training.init_from``: a new run starts at the checkpoint's validation loss; a missing or
  ill-fitting file is refused in one line; the file's content is part of the train settings.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, write_config
from ptm_mamba import train as train_module
from ptm_mamba.errors import PipelineError, StopRequested
from ptm_mamba.settings import Settings
from ptm_mamba.split import run_split
from ptm_mamba.hashing import file_sha256
from ptm_mamba.layout import BEST_CKPT, CONFIG_FILE, LAST_CKPT, METRICS_FILE, RESUME_DIR, run_dir
from ptm_mamba.stages import TRAIN, stage_fingerprint, stage_settings
from ptm_mamba.train import without_throughput

STEPS, LOG_STEPS = 6, 3


def records(run: Path) -> list[dict]:
    return json.loads((run / METRICS_FILE).read_text())


def train_steps(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if "train_loss" in m]


def derived(config: dict, **training) -> dict:
    cfg = copy.deepcopy(config)
    cfg["training"].update(training)
    return cfg


def train_settings(config: dict) -> dict:
    return stage_settings(Settings.from_config(config), TRAIN)


def fingerprint(config: dict) -> str:
    return stage_fingerprint(Settings.from_config(config), TRAIN)


def train_here(config: dict, split: Path, name: str) -> Path:
    """Train in this process on one thread (the numbers depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_module.train(Settings.from_config(config), split_dir=str(split), run_name=name, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[dict, Path, Path]:
    """A tiny split (ESM-2 on the fly) and the uninterrupted reference run with 2 batches per step:
    (config, split folder, reference run folder)."""
    root = tmp_path_factory.mktemp("features")
    config = tiny_config(root, n=48, training={"use_precomputed_embeddings": False, "max_steps": STEPS,
                                               "log_steps": LOG_STEPS, "gradient_accumulation_steps": 2,
                                               "warmup_steps": 4})  # lr differs at every step up to 4
    run_split(Settings.from_config(config), root / "split")
    ref = train_here(config, root / "split", "ref")
    return config, root / "split", ref


# ----------------------------------------------------------------------------- gradient accumulation

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_accumulating_two_batches_trains_as_two_processes(project, tmp_path):
    config, split, ref = project
    ddp = derived(config, gradient_accumulation_steps=1, num_processes=2)
    path = write_config(tmp_path / "ddp.yaml", **ddp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                             "--num_processes", "2", "--multi_gpu", "--dynamo_backend", "no",
                             "--main_process_port", str(free_port()), "-m", "ptm_mamba", "train",
                             "--config", str(path), "--split_dir", str(split), "--run_name", "ddp",
                             "--no_progress"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 processes" in result.stdout and "2 per optimiser step" in result.stdout

    one, two = records(ref), records(run_dir(ref.parent, "ddp"))
    assert len(one) == len(two)
    a, b = train_steps(one), train_steps(two)
    assert [m["Step"] for m in a] == [m["Step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert (x["Epoch"], x["tokens"]) == (y["Epoch"], y["tokens"])  # the same batches in each step
        assert x["lr"] == y["lr"]  # the schedule counts optimiser steps, whatever the process count
        for key in ("train_loss", "train_acc", "train_ptm_acc"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (key, x, y)  # measured: equal
    averages = [(m, n) for m, n in zip(one, two) if any(k.startswith("avg_") for k in m)]
    assert [m["Step"] for m, _ in averages] == [3, 6, 6]  # validations at 3 and 6, then the test set
    for m, n in averages:
        assert m.keys() == n.keys()
        for key in ("avg_val_loss", "avg_test_loss"):
            if key in m:
                assert m[key] == pytest.approx(n[key], rel=1e-6), (key, m, n)


def test_stop_between_accumulated_batches_resumes_exactly_and_keeps_tracking(project, monkeypatch):
    """SIGTERM arrives during the first batch of step 2: the run finishes step 2, saves and stops;
    run again, it ends as the uninterrupted run, and TensorBoard holds every step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, split, ref = project
    cfg = derived(config, log_with="tensorboard")
    assert fingerprint(cfg) == fingerprint(config)  # where metrics go changes no result
    run = run_dir(ref.parent, "stopped")
    calls = []
    real = train_module.backward_batch

    def signalled_at_third_batch(*args, **kwargs):
        calls.append(kwargs["sync"])
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "backward_batch", signalled_at_third_batch)
    with pytest.raises(StopRequested, match="stopped by SIGTERM at step 2;"):
        train_here(cfg, split, "stopped")
    monkeypatch.undo()
    assert calls == [False, True, False, True]  # the step was finished, not cut after its first batch
    state = torch.load(run / RESUME_DIR / "state.ckpt", weights_only=True)
    assert (state["position"]["step"], state["position"]["batch_in_epoch"]) == (2, 4)

    train_here(cfg, split, "stopped")
    metrics = records(run)
    assert without_throughput(metrics) == without_throughput(records(ref))
    assert not (run / RESUME_DIR).exists()

    events = EventAccumulator(str(run / "logs" / "ptm-mamba"))
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
              for tag in ("train_loss", "lr", "avg_val_loss", "avg_test_loss")}
    for tag in ("train_loss", "lr"):
        expected = [(m["Step"], m[tag]) for m in train_steps(metrics)]
        assert [s for s, _ in logged[tag]] == list(range(1, STEPS + 1))
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in expected], rel=1e-6)
    for tag in ("avg_val_loss", "avg_test_loss"):
        expected = [(m["Step"], m[tag]) for m in metrics if tag in m]
        assert [s for s, _ in logged[tag]] == [s for s, _ in expected] == ([3, 6] if "val" in tag else [6])
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_accumulation_is_a_train_setting_only_away_from_its_default(project):
    config, _, _ = project
    one = derived(config, gradient_accumulation_steps=1)
    assert "training.gradient_accumulation_steps" not in train_settings(one)  # earlier results stay valid
    assert "training.init_from" not in train_settings(one)
    assert fingerprint(one) != fingerprint(config)


def test_a_tracker_that_is_not_installed_is_one_line(project):
    config, split, ref = project
    from accelerate.tracking import get_available_trackers

    if "mlflow" in {str(t) for t in get_available_trackers()}:
        pytest.skip("mlflow is installed here")
    with pytest.raises(PipelineError, match=r"^training.log_with: mlflow is not installed") as err:
        train_here(derived(config, log_with="mlflow"), split, "mlflow")
    assert "\n" not in str(err.value)
    assert not run_dir(ref.parent, "mlflow").exists()


# ----------------------------------------------------------------------------- init_from

def test_run_initialised_from_a_checkpoint_starts_at_its_validation_loss(project, tmp_path):
    config, split, ref = project
    best = tmp_path / "best.ckpt"
    best.write_bytes((ref / BEST_CKPT).read_bytes())
    ref_metrics = records(ref)
    ref_val = {m["Step"]: m["avg_val_loss"] for m in ref_metrics if "avg_val_loss" in m}
    assert abs(ref_val[3] - ref_val[6]) > 1e-3  # the best validation's number is a specific one

    # lr ~ 0: the first step leaves the weights as loaded, so step 1's validation scores them
    cfg = derived(config, init_from=str(best), lr=1e-12, warmup_steps=0, max_steps=1, log_steps=1)
    run = train_here(cfg, split, "init")
    metrics = records(run)
    val = [m["avg_val_loss"] for m in metrics if "avg_val_loss" in m]
    assert val == [pytest.approx(min(ref_val.values()), rel=1e-6)]
    # the same first batch as the reference's first step, scored by other weights than a fresh model's
    assert abs(train_steps(metrics)[0]["train_loss"] - train_steps(ref_metrics)[0]["train_loss"]) > 0.01
    last = torch.load(run / LAST_CKPT, weights_only=True)
    assert last["position"]["step"] == 1 and last["scheduler"]["last_epoch"] == 1  # a new schedule
    assert last["settings"]["training.init_from"] == file_sha256(best)
    assert f"init_from: {best}" in (run / CONFIG_FILE).read_text()

    # the file's content, not its name, is the setting: other bytes rerun training
    before = fingerprint(cfg)
    best.write_bytes((ref / LAST_CKPT).read_bytes())
    assert fingerprint(cfg) != before


def test_a_missing_or_ill_fitting_init_checkpoint_is_one_line(project, tmp_path):
    config, split, ref = project
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(PipelineError, match=rf"^training.init_from: checkpoint not found: {missing}$"):
        train_here(derived(config, init_from=str(missing)), split, "missing")
    wider = derived(config, init_from=str(ref / BEST_CKPT))
    wider["model"]["d_model"] = 24
    best = re.escape(BEST_CKPT)
    with pytest.raises(PipelineError, match=rf"^training.init_from: .*{best}: weights do not fit the model: "
                                            r".*size mismatch") as err:
        train_here(wider, split, "wider")
    assert "\n" not in str(err.value)
    assert not run_dir(ref.parent, "missing").exists() and not run_dir(ref.parent, "wider").exists()
