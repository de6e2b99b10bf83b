"""The train stage on real tiny data: masking, metrics, checkpoints, exact resume, two processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, write_config
from ptm_mamba.data import BatchBuilder
from ptm_mamba.embedding_store import EmbeddingReader
from ptm_mamba.layout import (BEST_CKPT, LAST_CKPT, METRICS_FILE, RESUME_DIR, RUN_FILES, SPLIT_MAPPING, run_dir,
                              split_csv, split_paths, split_store_path)
from ptm_mamba.split import read_split
from ptm_mamba import train as train_module
from ptm_mamba.tokenizer import PTMTokenizer
from ptm_mamba.train import THROUGHPUT_FIELDS, lr_factor, without_throughput
from test_train_features import train_here

TOK = PTMTokenizer()


def builder(root: Path, config: dict, store: bool) -> BatchBuilder:
    proteins = read_split(split_csv(root / "split", "train"))
    reader = EmbeddingReader(split_store_path(root / "embeddings", "train")) if store else None
    return BatchBuilder(proteins, max_sequence_length=64, mask_prob=0.15, random_mask_only_prob=0.2, store=reader)


def test_masking_follows_the_original_rules(embedded_project):
    root, config = embedded_project
    b = builder(root, config, store=True)
    # the two shortest proteins fit the crop (their whole stored mask is checked), four others are cropped
    by_length = sorted(range(len(b)), key=lambda i: len(b.tokens[i]))
    rows = by_length[:2] + by_length[-4:]
    assert [len(b.tokens[i]) <= b.max_residues for i in rows] == [True, True, False, False, False, False]
    modes = set()
    checked = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        batch = b.build(rows, replicate=1, generator=gen)
        labels, pred = batch.labels, batch.pred_mask
        special = labels < TOK.first_residue_id
        is_ptm = labels > TOK.ptm_marker_id
        assert not (pred & special).any()  # never <cls>/<eos>/<pad>
        assert torch.equal(batch.input_ids[pred], torch.full_like(labels[pred], TOK.mask_id))
        assert torch.equal(batch.input_ids[~pred], labels[~pred])
        all_ptms_hidden = bool((pred | ~is_ptm).all())
        modes.add(all_ptms_hidden)
        # the random part is exactly the stored replicate's mask (cropped with the tokens)
        stored = [b.store.get(b.ids[i], 1)[1] for i in rows]
        for row in range(len(rows)):
            L = int(batch.lengths[row]) - 2
            rand_part = pred[row, 1:L + 1] & ~is_ptm[row, 1:L + 1]
            full = stored[row][1:-1]  # the residues' rows (the store's rows are <cls>, residues, <eos>)
            if len(full) == L:
                assert torch.equal(rand_part, torch.from_numpy(full) & ~is_ptm[row, 1:L + 1])
                checked += 1
    assert checked == 2 * 40  # the uncropped proteins, in every batch
    assert modes == {True, False}  # both the random-only and the random+PTM mode occur


def test_long_proteins_are_cropped_with_their_features(embedded_project):
    root, config = embedded_project
    b = builder(root, config, store=True)
    longest = max(range(len(b)), key=lambda i: len(b.tokens[i]))
    assert len(b.tokens[longest]) > 62
    batch = b.build([longest], replicate=0, generator=torch.Generator().manual_seed(3))
    assert batch.labels.shape[1] == 64
    window = batch.labels[0, 1:63].numpy()
    tokens = b.tokens[longest]
    start = next(s for s in range(len(tokens) - 61) if np.array_equal(tokens[s:s + 62], window))
    feats, _ = b.store.get(b.ids[longest], 0)  # rows: <cls>, residues, <eos>
    got = batch.esm_features[0].numpy()
    assert np.array_equal(got[1:63], feats[1 + start:1 + start + 62])  # the window's residue rows
    assert np.array_equal(got[0], feats[0]) and np.array_equal(got[63], feats[-1])  # the protein's <cls>/<eos>


def test_lr_schedule():
    kw = dict(warmup=4, total=20, min_ratio=0.1)
    assert [lr_factor(s, schedule="constant", **kw) for s in (0, 3, 4, 19)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_factor(19, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 / 16, abs=1e-9)
    assert lr_factor(20, schedule="cosine", **kw) == pytest.approx(0.1)


def train_cli(config: Path, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ptm_mamba", "train", "--config", str(config),
                             "--no_progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def assert_sane_throughput(steps: list[dict]) -> None:
    """Every step record says how fast training went and whether it was fed."""
    for m in steps:
        assert m["tokens_per_s"] > 0 and 0.0 <= m["loader_wait_fraction"] <= 1.0, m
        if torch.cuda.is_available():
            assert m["peak_memory_gib"] > 0, m
        else:
            assert m["peak_memory_gib"] is None, m  # null on the CPU, never left out


def test_train_outputs_metrics_and_weights_only_checkpoints(embedded_project):
    root, config = embedded_project
    result = run_cli("train", "--config", root / "config.yaml", "--split_dir", root / "split",
                     "--run_name", "plain", "--no_progress")
    assert result.returncode == 0, result.stdout + result.stderr
    out = run_dir(root / "outputs", "plain")
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    metrics = records(out / METRICS_FILE)
    assert metrics[0]["split_sizes"] == {"train": 44, "val": 8, "test": 8}
    steps = [m for m in metrics if "train_loss" in m]
    assert [m["Step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for m in steps:
        assert {"train_loss", "train_acc", "train_ptm_acc", "train_perplexity", "lr", "Epoch", "Step",
                "tokens", *THROUGHPUT_FIELDS} <= set(m)
        assert m["train_perplexity"] == pytest.approx(np.exp(m["train_loss"]))
    assert_sane_throughput(steps)
    logged = re.findall(r"step (\d+): val loss .*; train [\d,]+ tokens/s, \d+% of it waiting for data[;,]",
                        result.stdout)
    assert logged == ["3", "6"], result.stdout  # every validation's log line
    val_avgs = [m for m in metrics if "avg_val_loss" in m]
    assert [m["Step"] for m in val_avgs] == [3, 6]
    assert any("val_loss" in m and "batch" in m for m in metrics)
    test = [m for m in metrics if "avg_test_loss" in m]
    assert len(test) == 1 and "test_ptm_acc_by_type" in test[0]
    for name in (BEST_CKPT, LAST_CKPT):
        state = torch.load(out / name, weights_only=True)
        assert state["model_config"]["d_model"] == 16
    last = torch.load(out / LAST_CKPT, weights_only=True)
    assert last["position"]["step"] == 6 and "optimizer" in last
    assert not (out / RESUME_DIR).exists()


def test_validation_asks_the_same_questions_each_time(embedded_project):
    """Evaluation masks are fixed: two evaluations of the same weights agree exactly."""
    root, config = embedded_project
    b = BatchBuilder(read_split(split_csv(root / "split", "val")), max_sequence_length=64, mask_prob=0.15,
                     random_mask_only_prob=0.2,
                     store=EmbeddingReader(split_store_path(root / "embeddings", "val")))
    one = b.build(list(range(8)), replicate=0, generator=None)
    two = b.build(list(range(8)), replicate=0, generator=None)
    assert torch.equal(one.pred_mask, two.pred_mask) and torch.equal(one.esm_features, two.esm_features)


def test_killed_run_resumes_to_identical_metrics(embedded_project, tmp_path):
    root, config = embedded_project
    cfg = dict(config, run_name="resume")
    cfg["training"] = dict(config["training"], max_steps=12, log_steps=3)
    cfg_path = write_config(tmp_path / "config.yaml", **cfg)
    split = ("--split_dir", str(root / "split"))

    reference = train_cli(cfg_path, *split, "--run_name", "uninterrupted")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    out = run_dir(root / "outputs", "resume")
    state = out / RESUME_DIR / "state.ckpt"
    proc = train_cli(cfg_path, *split)
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / LAST_CKPT).exists()

    resumed = train_cli(cfg_path, *split)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    a = without_throughput(records(run_dir(root / "outputs", "uninterrupted") / METRICS_FILE))
    b = without_throughput(records(out / METRICS_FILE))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), (k, x, y)
            else:
                assert x[k] == y[k]


def test_standalone_train_splits_like_the_split_stage(embedded_project, tmp_path):
    root, config = embedded_project
    cfg = dict(config, run_name="standalone")
    cfg["training"] = dict(config["training"], max_steps=2, log_steps=2, num_workers=2)  # workers open the HDF5
    result = run_cli("train", "--config", write_config(tmp_path / "c.yaml", **cfg), "--no_progress")
    assert result.returncode == 0, result.stderr
    assert (run_dir(root / "outputs", "standalone") / SPLIT_MAPPING).read_text() == \
        split_paths(root / "split")["mapping"].read_text()


def test_on_the_fly_and_no_esm_modes_train(embedded_project, tmp_path):
    root, config = embedded_project
    for name, training in (("fly", {"use_precomputed_embeddings": False}), ("noesm", {"use_esm": False})):
        cfg = dict(config, run_name=name)
        cfg["training"] = dict(config["training"], max_steps=2, log_steps=2, **training)
        result = run_cli("train", "--config", write_config(tmp_path / f"{name}.yaml", **cfg),
                         "--split_dir", root / "split", "--no_progress")
        assert result.returncode == 0, result.stdout + result.stderr
        metrics = records(run_dir(root / "outputs", name) / METRICS_FILE)
        assert np.isfinite([m["train_loss"] for m in metrics if "train_loss" in m]).all()


def test_two_process_cpu_run_completes(embedded_project, tmp_path):
    """Two processes as the train rule launches them (accelerate launch --multi_gpu; gloo on CPU)."""
    from ptm_mamba.batching import epoch_batches, plan_batches

    root, config = embedded_project
    cfg = dict(config, run_name="ddp")
    cfg["training"] = dict(config["training"], max_steps=4, log_steps=2, num_processes=2,
                           per_device_train_batch_size=3)
    cfg_path = write_config(tmp_path / "config.yaml", **cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                             "--num_processes", "2", "--multi_gpu", "--dynamo_backend", "no", "--main_process_port",
                             "29517", "-m", "ptm_mamba", "train", "--config", str(cfg_path),
                             "--split_dir", str(root / "split"), "--no_progress"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 processes" in result.stdout
    metrics = records(run_dir(root / "outputs", "ddp") / METRICS_FILE)
    steps = [m for m in metrics if "train_loss" in m]
    assert [m["Step"] for m in steps] == [1, 2, 3, 4]
    assert_sane_throughput(steps)
    # step 1 counts the tokens of both processes' first batches (batches 0 and 1 of the epoch)
    train = BatchBuilder(read_split(split_csv(root / "split", "train")), max_sequence_length=1024, mask_prob=0.15,
                         random_mask_only_prob=0.2)
    batches = epoch_batches(train.lengths, 3000, 3, seed=cfg["seed"], epoch=0, world_size=2)
    assert steps[0]["tokens"] == sum(train.lengths[i] for b in batches[:2] for i in b)
    # the validation batches of both ranks are gathered: all of the split's batches, each once
    val = BatchBuilder(read_split(split_csv(root / "split", "val")), max_sequence_length=1024, mask_prob=0.15,
                       random_mask_only_prob=0.2)
    n_val = len(plan_batches(val.lengths, 3000, 3))
    val_batches = [m["batch"] for m in metrics if "val_loss" in m and m["Step"] == 2]
    assert sorted(val_batches) == list(range(n_val)) and n_val >= 2


def test_a_slow_data_loader_shows_as_waiting(embedded_project, monkeypatch, capsys):
    """Training batches that take 0.3 s each to make: most of every step is spent waiting for them,
    far more than in the same run fed at full speed, and only the throughput fields differ."""
    root, config = embedded_project
    cfg = dict(config, training=dict(config["training"], max_steps=4, log_steps=2))
    fed = train_here(cfg, root / "split", "fed")

    class SlowBatches(train_module.EpochBatches):
        def __getitem__(self, j):
            time.sleep(0.3)
            return super().__getitem__(j)

    monkeypatch.setattr(train_module, "EpochBatches", SlowBatches)
    capsys.readouterr()
    starved = train_here(cfg, root / "split", "starved")
    waits = {}
    for run in (fed, starved):
        steps = [m for m in records(run / METRICS_FILE) if "train_loss" in m]
        assert_sane_throughput(steps)
        waits[run.name] = [m["loader_wait_fraction"] for m in steps]
    fed_waits, starved_waits = waits[fed.name], waits[starved.name]
    assert min(starved_waits) > 0.7, waits
    assert max(fed_waits) < min(starved_waits) - 0.3, waits
    logged = [int(p) for p in re.findall(r"(\d+)% of it waiting for data", capsys.readouterr().out)]
    assert len(logged) == 2 and min(logged) >= 70, logged  # the log line at each validation says so too
    same = [without_throughput(records(run / METRICS_FILE)) for run in (fed, starved)]
    assert same[0] == same[1]  # the same model results, however fast it was fed
