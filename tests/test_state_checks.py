"""Stale and broken state is refused, and interrupted state is continued exactly.

- ESM-2 mismatch: embeddings, shards and a trained model made with other ESM-2 weights than the
  config (or the checkpoint) names are refused in one line (no run folder files, no output);
- what each stage depends on (``stages.DEPENDS_ON``): keys that only say how or where work is done
  change no fingerprint, result keys and input bytes change exactly their stages' fingerprints;
- a non-finite training loss, from a huge lr or NaN in stored embeddings, stops the run in one line
  and never leaves a checkpoint with NaN/Inf weights;
- splits: a failed rename leaves the previous split intact, a mixed/edited/stale/overlapping split
  is refused, duplicate sequences stay together;
- resume: a run stopped by SIGTERM or killed, whose outputs were then removed (as Snakemake does
  with a failed job's outputs), finishes with the uninterrupted run's metrics and weights.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import demo_subset, error_line, run_cli, settings_for, tiny_config, write_config, write_csv
from ptm_mamba import fileio, layout
from ptm_mamba.errors import PipelineError
from ptm_mamba.split import load_split_dir, read_split, run_split, split_proteins
from ptm_mamba.stages import EMBED, SPLIT, TRAIN, stage_fingerprint, stage_settings
from ptm_mamba.testing import write_tiny_esm2_checkpoint
from ptm_mamba.train import without_throughput

STAGES = (SPLIT, EMBED, TRAIN)
SPLIT_FILES = tuple(path.name for path in layout.split_paths("").values())
RUN_OUTPUTS = layout.RUN_FILES


# ----------------------------------------------------------------------------- helpers

def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def derived(config: dict, tmp_path: Path, name: str, **sections) -> tuple[dict, Path]:
    """A deep copy of ``config`` with outputs under ``tmp_path`` and ``sections`` merged in; its file."""
    cfg = copy.deepcopy(config)
    cfg["run_name"] = name
    cfg["training"]["output_dir"] = str(tmp_path / "outputs")
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg, write_config(tmp_path / f"{name}.yaml", **cfg)


def finite_checkpoints(run: Path) -> list[Path]:
    """Every .ckpt under ``run`` loads weights-only and holds finite weights only; returns them."""
    found = sorted(run.rglob("*.ckpt"))
    for path in found:
        state = torch.load(path, weights_only=True)
        for part in ("model", "best_model"):
            for name, tensor in (state.get(part) or {}).items():
                assert torch.isfinite(tensor).all(), f"{path}: {part}.{name} is not finite"
    return found


def set_key(config: dict, key: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value
    return config


def all_settings(config: dict) -> dict:
    settings = settings_for(config)
    return {stage: (stage_settings(settings, stage), stage_fingerprint(settings, stage)) for stage in STAGES}


def changed_stages(before: dict, after: dict) -> set[str]:
    """The stages whose settings differ between two configs, or two :func:`all_settings` snapshots
    (a snapshot is needed when a file changes in between: settings hash the files when asked)."""
    a = before if set(before) == set(STAGES) else all_settings(before)
    b = after if set(after) == set(STAGES) else all_settings(after)
    for stage in STAGES:  # settings and fingerprint agree on whether the stage changed
        assert (a[stage][0] == b[stage][0]) == (a[stage][1] == b[stage][1]), stage
    return {stage for stage in STAGES if a[stage] != b[stage]}


def copy_esm(source: str, folder: Path) -> Path:
    """A copy of a fair-esm checkpoint (and its contact regression) in ``folder``, same name."""
    source = Path(source)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, folder / source.name)
    regression = source.with_name(f"{source.stem}-contact-regression.pt")
    shutil.copy(regression, folder / regression.name)
    return folder / source.name


# ----------------------------------------------------------------------------- ESM-2 mismatch (case 4)

@pytest.fixture(scope="module")
def other_esms(tmp_path_factory) -> dict[str, Path]:
    """ESM-2 checkpoints that are not the embedded project's: same size other weights, another size."""
    folder = tmp_path_factory.mktemp("other-esm")
    return {
        "same_dim_other_weights": write_tiny_esm2_checkpoint(
            folder / "esm2_t2_other.pt", num_layers=2, embed_dim=16, attention_heads=2, seed=1),
        "other_dim": write_tiny_esm2_checkpoint(
            folder / "esm2_t2_wide.pt", num_layers=2, embed_dim=32, attention_heads=4, seed=0),
    }


@pytest.mark.parametrize("which", ["same_dim_other_weights", "other_dim"])
def test_train_refuses_embeddings_of_other_esm_weights(embedded_project, other_esms, tmp_path, which):
    root, config = embedded_project
    _, path = derived(config, tmp_path, "esm-" + which.replace("_", "-"), esm={"model": str(other_esms[which])})
    result = run_cli("train", "--config", path, "--split_dir", root / "split", "--no_progress")
    line = error_line(result, "esm.model", "embeddings.h5", "rerun the embed stage")
    assert line.count("sha256:") == 2  # what the file was made with and what the config gives
    assert files_under(tmp_path / "outputs") == []  # no best.ckpt/last.ckpt, no run folder files at all


def test_gather_refuses_shards_of_other_esm_weights(embedded_project, other_esms, tmp_path):
    root, config = embedded_project
    _, path = derived(config, tmp_path, "gather", esm={"model": str(other_esms["same_dim_other_weights"])})
    shards = sorted(layout.shard_path(root / "embeddings", "train", 0, 2).parent.glob("*.h5"))
    assert len(shards) == 2
    out = layout.split_store_path(tmp_path / "gathered", "train")
    result = run_cli("gather", "--config", path, "--split", "train",
                     "--split_file", layout.split_csv(root / "split", "train"), "--shards", *shards, "--output", out)
    error_line(result, "esm.model", str(shards[0]))
    assert files_under(out.parent) == []


def test_predict_refuses_an_esm_file_changed_after_training(embedded_project, tmp_path):
    """The checkpoint records the ESM-2 weights' hash; the same file name with other weights is refused."""
    from ptm_mamba.train import train

    root, config = embedded_project
    esm = copy_esm(config["esm"]["model"], tmp_path / "esm")
    cfg, _ = derived(config, tmp_path, "fly", esm={"model": str(esm)},
                     training={"use_precomputed_embeddings": False, "max_steps": 2, "log_steps": 2})
    out = train(settings_for(cfg), split_dir=str(root / "split"), progress=False)
    fasta = tmp_path / "some.fasta"
    fasta.write_text(">a\nMK<Phosphoserine>LLVRRAS\n>b\nM<N-acetylalanine>KNGTWLLK\n")
    ok = run_cli("predict", "--checkpoint", out / layout.BEST_CKPT, "--input", fasta, "--output", tmp_path / "ok.h5")
    assert ok.returncode == 0, ok.stderr  # the same weights: predicts

    write_tiny_esm2_checkpoint(esm, num_layers=2, embed_dim=16, attention_heads=2, seed=1)  # same name, other weights
    result = run_cli("predict", "--checkpoint", out / layout.BEST_CKPT, "--input", fasta,
                     "--output", tmp_path / "out.h5")
    error_line(result, f"ESM model {esm}", "not the weights this model was trained with")
    assert not (tmp_path / "out.h5").exists()
    assert not list(tmp_path.glob(".out.h5*"))  # no temp file either


# ----------------------------------------------------------------------------- what each stage depends on

NEUTRAL = [  # how or where the work is done: no stage's result changes
    ("embedding.max_tokens_per_batch", 123456),
    ("embedding.batch_size", 3),
    ("embedding.shards", 7),
    ("training.num_workers", 4),
    ("training.resume_from_checkpoint", "/somewhere/else/last.ckpt"),
    ("training.output_dir", "/somewhere/else/outputs"),
    ("training.embeddings_dir", "/somewhere/else/embeddings"),
    ("run_name", "another-name"),
]
MODES = {
    "precomputed": {"use_esm": True, "use_precomputed_embeddings": True},
    "on_the_fly": {"use_esm": True, "use_precomputed_embeddings": False},
    "no_esm": {"use_esm": False},
}


@pytest.fixture(scope="module")
def settings_config(tmp_path_factory) -> dict:
    return tiny_config(tmp_path_factory.mktemp("settings"), n=20)


@pytest.mark.parametrize("mode", MODES)
def test_keys_that_do_not_change_results_change_no_fingerprint(settings_config, mode):
    config = copy.deepcopy(settings_config)
    config["training"].update(MODES[mode])
    for key, value in NEUTRAL:
        assert changed_stages(config, set_key(config, key, value)) == set(), key


@pytest.mark.parametrize("mode", MODES)
def test_result_keys_change_exactly_their_stages(settings_config, mode):
    config = copy.deepcopy(settings_config)
    config["training"].update(MODES[mode])
    uses_esm = mode != "no_esm"
    expected = {
        ("training.lr", 0.5): {TRAIN},
        ("training.mask_prob", 0.3): {EMBED, TRAIN},
        ("esm.repr_layer", 1): {EMBED, TRAIN} if uses_esm else {EMBED},
        ("dataset.split_seed", 7): {SPLIT},
        ("dataset.val_size", 5): {SPLIT},
        ("embedding.mask_replicates", 3): {EMBED, TRAIN} if mode == "precomputed" else {EMBED},
        ("model.d_model", 24): {TRAIN},
        ("seed", 1): {TRAIN},
    }
    for (key, value), stages in expected.items():
        assert changed_stages(config, set_key(config, key, value)) == stages, key


@pytest.mark.parametrize("mode", MODES)
def test_input_file_bytes_change_exactly_their_stages(tmp_path, mode):
    config = tiny_config(tmp_path, n=20)
    config["training"].update(MODES[mode])
    data, esm = Path(config["dataset"]["dataset_location"]), Path(config["esm"]["model"])

    # the ESM-2 weights count by content: a copy under another path is the same model
    copied = copy_esm(str(esm), tmp_path / "copy")
    assert changed_stages(config, set_key(config, "esm.model", str(copied))) == set()

    before = all_settings(config)
    data.write_text(data.read_text().rstrip("\n") + "A\n")  # one more residue at the end
    assert changed_stages(before, all_settings(config)) == {SPLIT}

    before = all_settings(config)
    write_tiny_esm2_checkpoint(esm, num_layers=2, embed_dim=16, attention_heads=2, seed=1)  # same file, other weights
    assert changed_stages(before, all_settings(config)) == ({EMBED, TRAIN} if mode != "no_esm" else {EMBED})


def test_large_esm_file_change_is_seen_through_the_hash_cache(settings_config, tmp_path, monkeypatch):
    """Hashes of files of 64 MiB and more (real ESM-2 weights) are cached by stat: rewriting the
    file in place (same inode, same size) must still change the embed and train fingerprints."""
    from ptm_mamba import hashing

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    big = tmp_path / "esm2_big.pt"
    with open(big, "wb") as fh:
        fh.truncate(hashing._CACHE_FROM_BYTES)
    config = set_key(settings_config, "esm.model", str(big))
    before = all_settings(config)
    assert (tmp_path / "cache" / "ptm-mamba" / "sha256.json").exists()  # the cached path was taken
    assert all_settings(config) == before
    inode = big.stat().st_ino
    with open(big, "r+b") as fh:
        fh.seek(12345)
        fh.write(b"\x01")
    assert big.stat().st_ino == inode and big.stat().st_size == hashing._CACHE_FROM_BYTES
    assert changed_stages(before, all_settings(config)) == {EMBED, TRAIN}


# ----------------------------------------------------------------------------- non-finite loss, NaN embeddings (case 5)

@pytest.mark.parametrize("log_steps", [3, 1], ids=["no-validation-before-nan", "validation-every-step"])
def test_nan_loss_stops_training_without_a_checkpoint(embedded_project, tmp_path, log_steps):
    root, config = embedded_project
    _, path = derived(config, tmp_path, "nan", training={"lr": 1.0e30, "grad_clip": None, "log_steps": log_steps})
    result = run_cli("train", "--config", path, "--split_dir", root / "split", "--no_progress")
    line = error_line(result, "(NaN/Inf); stopped before the optimiser step", "no checkpoint of it written")
    nan_step = re.search(r"error: step (\d+): the training loss is (nan|inf|-inf) ", line)
    assert nan_step, line
    assert int(nan_step.group(1)) < 3 or log_steps == 1  # log_steps 3: no validation ran before it
    run = layout.run_dir(tmp_path / "outputs", "nan")
    assert not (run / layout.BEST_CKPT).exists() and not (run / layout.LAST_CKPT).exists()
    saved = finite_checkpoints(run)  # with a validation at step 1 the resume state was saved: finite weights
    assert [p.name for p in saved] == ([] if log_steps == 3 else ["state.ckpt"])


def test_a_learning_rate_that_overflows_the_optimiser_is_one_line(embedded_project, tmp_path):
    root, config = embedded_project
    _, path = derived(config, tmp_path, "huge", training={"lr": 1.0e38, "grad_clip": None})
    result = run_cli("train", "--config", path, "--split_dir", root / "split", "--no_progress")
    error_line(result, "training.lr: 1e+38 overflows the optimiser's step size at step 1")
    assert finite_checkpoints(tmp_path / "outputs") == []


def test_nan_in_stored_embeddings_stops_training(embedded_project, tmp_path):
    root, config = embedded_project
    copy_dir = tmp_path / "embeddings"
    shutil.copytree(root / "embeddings", copy_dir)
    original = layout.split_store_path(root / "embeddings", "train")
    original_bytes = original.read_bytes()
    with h5py.File(layout.split_store_path(copy_dir, "train"), "r+") as f:  # a self-contained copy of the shards
        ids = [x.decode() for x in f["ids"][()]]
        f["embeddings/0"][:] = np.nan  # replicate 0 is what epoch 0 reads
    _, path = derived(config, tmp_path, "nanemb", training={"embeddings_dir": str(copy_dir)})
    result = run_cli("train", "--config", path, "--split_dir", root / "split", "--no_progress")
    line = error_line(result, str(layout.split_store_path(copy_dir, "train")), "replicate 0 has NaN/Inf embeddings")
    named = re.search(r"protein '([^']+)'", line)
    assert named and named.group(1) in ids
    assert finite_checkpoints(tmp_path / "outputs") == []
    assert original.read_bytes() == original_bytes  # the shared project's file is untouched


# ----------------------------------------------------------------------------- splits (case 6)

@pytest.fixture
def split_project(tmp_path) -> tuple[dict, Path, Path]:
    """A tiny dataset split with split_seed 42 into D: (config, its file, D)."""
    config = tiny_config(tmp_path, n=30)
    path = write_config(tmp_path / "config.yaml", **config)
    run_split(settings_for(config), tmp_path / "D")
    return config, path, tmp_path / "D"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("failing_call", [1, 3, 5])
def test_failed_rename_leaves_the_previous_split(split_project, monkeypatch, failing_call):
    config, _, d = split_project
    first = snapshot(d)
    assert sorted(first) == sorted(SPLIT_FILES)
    calls = []
    real_replace = os.replace

    def flaky_replace(src, dst, *args, **kwargs):
        calls.append(Path(dst).name)
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device (injected)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="injected"):
        run_split(settings_for(set_key(config, "dataset.split_seed", 7)), d)
    monkeypatch.undo()
    assert calls[:failing_call] == list(SPLIT_FILES[:failing_call])  # the renames run in order, summary last
    assert snapshot(d) == first  # byte-identical, and no .*tmp* / .*old* file left beside them
    load_split_dir(d, settings_for(config))  # and it is still a valid split


def test_failed_first_split_leaves_no_split_files(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, n=30)
    calls = []
    real_replace = os.replace

    def flaky_replace(src, dst, *args, **kwargs):
        calls.append(Path(dst).name)
        if len(calls) == 3:
            raise OSError(5, "Input/output error (injected)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="injected"):
        run_split(settings_for(config), tmp_path / "D")
    monkeypatch.undo()
    assert list((tmp_path / "D").iterdir()) == []  # the two files already renamed are removed again
    with pytest.raises(PipelineError, match=f"{layout.SPLIT_SUMMARY} not found"):
        load_split_dir(tmp_path / "D", settings_for(config))


def test_mixed_split_is_refused(split_project, tmp_path):
    """A kill between the renames: train.csv of another split beside the first one's summary."""
    config, path, d = split_project
    run_split(settings_for(set_key(config, "dataset.split_seed", 7)), tmp_path / "E")
    train, other = layout.split_csv(d, "train"), layout.split_csv(tmp_path / "E", "train")
    assert other.read_bytes() != train.read_bytes()
    shutil.copy(other, train)
    with pytest.raises(PipelineError, match=rf"{re.escape(train.name)} is not the file "
                                            rf"{re.escape(layout.SPLIT_SUMMARY)} records"):
        load_split_dir(d, settings_for(config))

    shard = tmp_path / "shard.h5"
    result = run_cli("embed-shard", "--config", path, "--split", "val", "--split_file", layout.split_csv(d, "val"),
                     "--shard", "0", "--num_shards", "2", "--output", shard)
    error_line(result, str(train), "rerun the split stage")
    assert not shard.exists()
    result = run_cli("train", "--config", path, "--split_dir", d, "--no_progress")
    error_line(result, str(train), "rerun the split stage")
    assert files_under(Path(config["training"]["output_dir"])) == []


def test_duplicate_sequences_stay_in_one_split(tmp_path):
    rng = np.random.default_rng(5)
    body = "".join(rng.choice(list("ACDEFGHIKLMNPQRTVWY"), 40))
    other = "".join(rng.choice(list("ACDEFGHIKLMNPQRTVWY"), 40))
    data = demo_subset(tmp_path / "demo.csv", 30)
    rows = [tuple(line.split(",", 1)) for line in data.read_text().splitlines()[1:]]
    rows += [(f"DUP_A{i}", "M<N-acetylalanine>" + body) for i in range(3)]  # one sequence, three ids
    rows += [("DUP_B1", "MK<Phosphoserine>" + other), ("DUP_B2", "MKS" + other)]  # same residues, other PTMs
    write_csv(tmp_path / "data.csv", rows)
    path = write_config(tmp_path / "config.yaml",
                        dataset={"dataset_location": str(tmp_path / "data.csv"), "val_size": 8, "test_size": 8})
    result = run_cli("split", "--config", path, "--output_dir", tmp_path / "split")
    assert result.returncode == 0, result.stderr
    assert "2 groups of duplicate sequences (5 proteins), each kept in one split" in result.stdout
    split = layout.split_paths(tmp_path / "split")
    summary = json.loads(split["summary"].read_text())
    assert summary["duplicates"]["groups"] == 2 and summary["duplicates"]["proteins"] == 5
    mapping = json.loads(split["mapping"].read_text())
    assert len({mapping[f"DUP_A{i}"] for i in range(3)}) == 1
    assert len({mapping["DUP_B1"], mapping["DUP_B2"]}) == 1
    # whatever the seed, each group lands whole in one split
    from ptm_mamba.dataset import read_dataset

    proteins = read_dataset(tmp_path / "data.csv")
    for seed in range(25):
        where = {p.id: name for name, ps in split_proteins(proteins, val_size=8, test_size=8, seed=seed).items()
                 for p in ps}
        assert len({where[f"DUP_A{i}"] for i in range(3)}) == 1 and where["DUP_B1"] == where["DUP_B2"], seed


def rewrite_split(d: Path, texts: dict[str, str]) -> None:
    """Replace some split files (by their layout.split_paths key) and make summary.json's ``files``
    hashes match them (a hand-made split)."""
    import hashlib

    files = layout.split_paths(d)
    summary = json.loads(files["summary"].read_text())
    for key, text in texts.items():
        files[key].write_text(text)
        summary["files"][files[key].name] = "sha256:" + hashlib.sha256(files[key].read_bytes()).hexdigest()
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n")


def test_overlapping_split_is_refused(split_project):
    config, path, d = split_project
    load_split_dir(d, settings_for(config))  # the real split passes
    files = layout.split_paths(d)
    victim = read_split(files["train"])[0]
    victim_id, victim_seq = victim.id, victim.sequence
    assert "," not in victim_seq and '"' not in victim_seq  # a plain CSV line below
    val_text = files["val"].read_text()
    mapping = json.loads(files["mapping"].read_text())

    # the same sequence under two ids, one in train and one in val
    rewrite_split(d, {"val": val_text + f"COPY_OF_{victim_id},{victim_seq}\n",
                      "mapping": json.dumps({**mapping, f"COPY_OF_{victim_id}": "val"}, indent=2) + "\n"})
    with pytest.raises(PipelineError) as err:
        load_split_dir(d, settings_for(config))
    message = str(err.value)
    assert f"'{victim_id}' (train)" in message and f"'COPY_OF_{victim_id}' (val)" in message
    assert "same sequence" in message and "\n" not in message
    result = run_cli("train", "--config", path, "--split_dir", d, "--no_progress")
    error_line(result, victim_id, f"COPY_OF_{victim_id}", "same sequence")

    # the same id in two splits
    rewrite_split(d, {"val": val_text + f"{victim_id},{victim_seq}\n",
                      "mapping": json.dumps(mapping, indent=2) + "\n"})
    with pytest.raises(PipelineError, match=rf"id '{victim_id}' is in both train and val"):
        load_split_dir(d, settings_for(config))


def test_stale_split_is_refused(split_project, tmp_path):
    config, _, d = split_project
    _, other_seed = derived(config, tmp_path, "seed7", dataset={"split_seed": 7})
    result = run_cli("train", "--config", other_seed, "--split_dir", d, "--no_progress")
    error_line(result, "dataset.split_seed = 42", "gives 7", "rerun the split stage")

    data = Path(config["dataset"]["dataset_location"])
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # the dataset edited after the split: one protein fewer
    _, same = derived(config, tmp_path, "edited")
    result = run_cli("train", "--config", same, "--split_dir", d, "--no_progress")
    error_line(result, "dataset.dataset_location", "rerun the split stage")
    assert files_under(tmp_path / "outputs") == []


# ----------------------------------------------------------------------------- resume that always finishes

@pytest.fixture(scope="module")
def resume_reference(tmp_path_factory) -> tuple[dict, Path, Path, Path]:
    """lr 1.0: the first validation is the best, later ones are worse. The uninterrupted run,
    trained in this process: (config, its file, split folder, reference run folder)."""
    from ptm_mamba.train import train

    root = tmp_path_factory.mktemp("resume")
    config = tiny_config(root, n=48, training={"use_precomputed_embeddings": False, "max_steps": 12,
                                               "log_steps": 3, "lr": 1.0, "warmup_steps": 0})
    run_split(settings_for(config), root / "split")
    path = write_config(root / "config.yaml", **config)
    threads = torch.get_num_threads()
    torch.set_num_threads(RESUME_THREADS)  # as the CLI runs: the numbers depend on the thread count
    try:
        ref = train(settings_for(config), split_dir=str(root / "split"), run_name="ref", progress=False)
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((ref / layout.METRICS_FILE).read_text())
    val = {m["Step"]: m["avg_val_loss"] for m in metrics if "avg_val_loss" in m}
    assert sorted(val) == [3, 6, 9, 12]
    assert all(val[3] < val[step] for step in (6, 9, 12)), val  # best.ckpt holds step 3's weights
    return config, path, root / "split", ref


RESUME_THREADS = 1  # one thread: the same numbers on any machine, and no slow-down when cores are shared


def train_command(path: Path, split: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "ptm_mamba", "train", "--config", str(path), "--split_dir", str(split),
            "--run_name", name, "--no_progress"]


def resume_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(RESUME_THREADS)}


def interrupt_once_saved(command: list[str], run: Path, sig: int, tries: int = 3) -> subprocess.Popen:
    """Start training; send ``sig`` as soon as its first resume state exists. A run that ended
    before the state was seen (an overloaded machine) is started again."""
    state = run / layout.RESUME_DIR / "state.ckpt"
    for _ in range(tries):
        shutil.rmtree(run, ignore_errors=True)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=resume_env())
        deadline = time.monotonic() + 300
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        if proc.poll() is None and state.exists():
            proc.send_signal(sig)
            return proc
        proc.kill()
        proc.communicate()
    pytest.fail(f"the run never got interrupted after its first save ({tries} tries)")


def finish_and_compare(command: list[str], run: Path, ref: Path) -> None:
    for name in RUN_OUTPUTS:  # what Snakemake removes of a failed job: its declared outputs
        (run / name).unlink(missing_ok=True)
    assert (run / layout.RESUME_DIR / "state.ckpt").exists()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=resume_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout
    assert without_throughput(json.loads((run / layout.METRICS_FILE).read_text())) == \
        without_throughput(json.loads((ref / layout.METRICS_FILE).read_text()))
    for name in (layout.BEST_CKPT, layout.LAST_CKPT):
        mine, theirs = (torch.load(r / name, weights_only=True)["model"] for r in (run, ref))
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), (name, key)
    assert not (run / layout.RESUME_DIR).exists()


def test_run_stopped_by_sigterm_resumes_to_the_uninterrupted_result(resume_reference):
    config, path, split, ref = resume_reference
    run = layout.run_dir(config["training"]["output_dir"], "sig")
    command = train_command(path, split, "sig")
    proc = interrupt_once_saved(command, run, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    stopped = re.fullmatch(r"error: stopped by SIGTERM at step (\d+); the state is saved in (.+): "
                           r"run the same command again to continue exactly there", lines[0])
    assert stopped and Path(stopped.group(2)) == run / layout.RESUME_DIR / "state.ckpt", lines[0]
    step = int(stopped.group(1))
    assert 3 <= step < 12
    state = torch.load(run / layout.RESUME_DIR / "state.ckpt", weights_only=True)
    assert state["position"]["step"] == step
    assert (run / layout.BEST_CKPT).exists() and not (run / layout.LAST_CKPT).exists()
    finish_and_compare(command, run, ref)


def test_killed_run_whose_outputs_were_removed_resumes_to_the_uninterrupted_result(resume_reference):
    config, path, split, ref = resume_reference
    run = layout.run_dir(config["training"]["output_dir"], "kill")
    command = train_command(path, split, "kill")
    proc = interrupt_once_saved(command, run, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    finish_and_compare(command, run, ref)


def test_embeddings_of_an_older_store_format_rerun_and_are_refused(tmp_path):
    """The embed stage's format (stages.FORMATS) is part of its settings: embeddings written before
    the <cls>/<eos> rows (format 1, no format recorded) change the fingerprint Snakemake compares,
    and a reader's settings check refuses them in one line."""
    from ptm_mamba.stages import FORMATS, check_settings, fingerprint_of

    config = settings_for(tiny_config(tmp_path))
    settings = stage_settings(config, EMBED)
    assert settings["format"] == FORMATS[EMBED] == 2
    older = {k: v for k, v in settings.items() if k != "format"}
    assert stage_fingerprint(config, EMBED) != fingerprint_of(older)
    with pytest.raises(PipelineError, match=r"^x\.h5: written by another version of the embed stage \(format 1, "
                                            r"this version's is 2\); rerun$"):
        check_settings(older, config, EMBED, "x.h5", "rerun")
    check_settings(settings, config, EMBED, "x.h5", "rerun")
