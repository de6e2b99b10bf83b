"""The embed stage end to end: PTM alignment, no leakage, shards, faults, the seed's one command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from conftest import run_cli, tiny_config, write_config
from ptm_mamba.data import BatchBuilder
from ptm_mamba.embed import embed_proteins, store_attrs
from ptm_mamba.embedding_store import EmbeddingReader, plan_shards
from ptm_mamba.layout import shard_path, split_csv, split_paths, split_store_path
from ptm_mamba.esm import load_esm_of
from ptm_mamba.dataset import Protein
from ptm_mamba.masking import replicate_mask
from ptm_mamba.settings import Settings
from ptm_mamba.tokenizer import PTMTokenizer

TOK = PTMTokenizer()


def protein(pid: str, seq: str) -> Protein:
    return Protein(pid, seq, tuple(TOK.split(seq)))


def embed_one(config, esm_model, p: Protein, path: Path) -> EmbeddingReader:
    embed_proteins(config, esm_model, [p], path, store_attrs(config, esm_model.name, esm_model.repr_layer,
                                                             "train", [p]), progress=False)
    return EmbeddingReader(path)


def test_rows_align_with_ptm_tokens_and_ptms_are_masked_for_esm(tmp_path):
    from ptm_mamba.esm import embed

    config = Settings.from_config(tiny_config(tmp_path, embedding={"mask_replicates": 1}))
    esm_model = load_esm_of(config, device="cpu")
    p = protein("P1", "MK<Phosphoserine>LLV<N-linked (GlcNAc...) asparagine>GT")
    store = embed_one(config, esm_model, p, tmp_path / "s.h5")
    feats, mask = store.get("P1", 0)
    assert feats.shape == (9 + 2, esm_model.embed_dim)  # <cls>, one row per token (a PTM is one), <eos>
    expected_mask = replicate_mask("P1", 0, 9, config.training.mask_prob)
    assert np.array_equal(mask, np.concatenate([[False], expected_mask, [False]]))
    # ESM saw <mask> at both PTM positions (and the random ones): compare with a direct run
    esm_mask = expected_mask.copy()
    esm_mask[[2, 6]] = True
    [(_, direct)] = list(embed(esm_model, [("P1", "MKSLLVNGT", esm_mask)], progress=False))
    assert np.allclose(feats.astype(np.float32), direct, atol=2e-3)
    [(_, unmasked)] = list(embed(esm_model, [("P1", "MKSLLVNGT", None)], progress=False))
    assert not np.allclose(direct, unmasked, atol=1e-3)


def test_no_leak_a_hidden_residue_does_not_reach_the_model(tmp_path):
    """Change the true residue at a position replicate k hides: nothing the model sees changes."""
    config = Settings.from_config(tiny_config(tmp_path, embedding={"mask_replicates": 4}))
    esm_model = load_esm_of(config, device="cpu")
    seq = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVV"
    masks = [replicate_mask("P", k, len(seq), config.training.mask_prob) for k in range(4)]
    j = next(j for j in range(1, len(seq)) if masks[1][j] and not masks[2][j])
    changed = seq[:j] + ("W" if seq[j] != "W" else "C") + seq[j + 1:]
    a = embed_one(config, esm_model, protein("P", seq), tmp_path / "a.h5")
    b = embed_one(config, esm_model, protein("P", changed), tmp_path / "b.h5")
    # replicate 1 hides j: its features are identical; replicate 2 shows j: they differ
    assert np.array_equal(a.get("P", 1)[0], b.get("P", 1)[0])
    assert not np.array_equal(a.get("P", 2)[0], b.get("P", 2)[0])
    # and the whole training input of the epochs using replicate 1 is the same
    for seed in range(5):
        batches = [BatchBuilder([protein("P", s)], max_sequence_length=1024, mask_prob=0.15,
                                random_mask_only_prob=0.5, store=store).build(
            [0], replicate=1, generator=torch.Generator().manual_seed(seed)) for s, store in ((seq, a), (changed, b))]
        assert torch.equal(batches[0].input_ids, batches[1].input_ids)
        assert torch.equal(batches[0].esm_features, batches[1].esm_features)
        assert batches[0].pred_mask[0, j + 1]  # the changed residue is one the model must predict


def test_windows_for_long_proteins(tmp_path):
    from ptm_mamba.esm import embed

    config = Settings.from_config(tiny_config(tmp_path))
    esm_model = load_esm_of(config, device="cpu")
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 150))
    [(_, direct)] = list(embed(esm_model, [("x", seq, None)], window=150, overlap=20, progress=False))
    [(_, windowed)] = list(embed(esm_model, [("x", seq, None)], window=100, overlap=40, progress=False))
    assert direct.shape == windowed.shape == (150 + 2, esm_model.embed_dim)  # <cls>, residues, <eos>
    [(_, first)] = list(embed(esm_model, [("x", seq[:100], None)], window=100, overlap=0, progress=False))
    [(_, last)] = list(embed(esm_model, [("x", seq[50:], None)], window=100, overlap=0, progress=False))
    assert np.allclose(windowed[0], first[0], atol=1e-5)  # <cls> of the first window
    assert np.allclose(windowed[1:51], first[1:51], atol=1e-5)  # residues 0..49: the first window only
    assert np.allclose(windowed[51:101], (first[51:101] + last[1:51]) / 2, atol=1e-5)  # 50..99: both
    assert np.allclose(windowed[101:151], last[51:101], atol=1e-5)  # 100..149: the last window only
    assert np.allclose(windowed[151], last[101], atol=1e-5)  # <eos> of the last window


def test_shards_are_balanced_by_residues():
    proteins = [protein(f"P{i}", "A" * n) for i, n in enumerate([500, 20, 300, 250, 40, 200, 100, 90])]
    shards = plan_shards(proteins, 3)
    assert sorted(p.id for s in shards for p in s) == sorted(p.id for p in proteins)
    loads = [sum(p.length for p in s) for s in shards]
    assert max(loads) - min(loads) <= 100
    assert plan_shards(proteins, 3) == shards


def test_embedding_is_deterministic(embedded_project, tmp_path):
    root, config = embedded_project
    out = tmp_path / "again.h5"
    result = run_cli("embed-shard", "--config", root / "config.yaml", "--split", "val",
                     "--split_file", split_csv(root / "split", "val"), "--shard", 1, "--num_shards", 2, "--output", out)
    assert result.returncode == 0, result.stderr
    again, before = EmbeddingReader(out), EmbeddingReader(shard_path(root / "embeddings", "val", 1, 2))
    assert again.ids == before.ids
    for pid in again.ids:
        for k in range(2):
            assert np.array_equal(again.get(pid, k)[0], before.get(pid, k)[0])


def test_killed_shard_leaves_nothing_gather_accepts(embedded_project, tmp_path):
    root, config = embedded_project
    out = shard_path(tmp_path, "train", 0, 2)
    cfg = dict(config)
    cfg["embedding"] = dict(config["embedding"], max_tokens_per_batch=300)  # many small batches
    cfg_path = write_config(tmp_path / "c.yaml", **cfg)
    proc = subprocess.Popen([sys.executable, "-m", "ptm_mamba", "embed-shard", "--config", str(cfg_path),
                             "--split", "train", "--split_file", str(split_csv(root / "split", "train")),
                             "--shard", "0", "--num_shards", "2", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.parent.glob(".*tmp*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    result = run_cli("gather", "--config", cfg_path, "--split", "train",
                     "--split_file", split_csv(root / "split", "train"), "--shards", out, shard_path(root / "embeddings", "train", 1, 2), "--output", tmp_path / "g.h5")
    assert result.returncode == 2 and out.name in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.h5").exists()
    # the rerun of the job clears the killed try's temporary file and writes a complete shard
    rerun = run_cli("embed-shard", "--config", cfg_path, "--split", "train", "--split_file",
                    split_csv(root / "split", "train"), "--shard", 0, "--num_shards", 2, "--output", out)
    assert rerun.returncode == 0, rerun.stderr
    assert out.exists() and not list(out.parent.glob(".*tmp*"))


def test_corrupt_or_stale_shard_is_refused(embedded_project, tmp_path):
    root, config = embedded_project
    good = [shard_path(root / "embeddings", "val", i, 2) for i in range(2)]
    bad = tmp_path / good[0].name
    data = good[0].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    args = ["gather", "--config", root / "config.yaml", "--split", "val",
            "--split_file", split_csv(root / "split", "val")]
    result = run_cli(*args, "--shards", bad, good[1], "--output", tmp_path / "g.h5")
    assert result.returncode == 2 and str(bad) in result.stderr and "Traceback" not in result.stderr
    # a shard of another split (stale fingerprint / wrong ids) is refused too
    other = shard_path(root / "embeddings", "test", 0, 2)
    result = run_cli(*args, "--shards", other, good[1], "--output", tmp_path / "g.h5")
    assert result.returncode == 2 and "test" in result.stderr.lower(), result.stderr
    assert not (tmp_path / "g.h5").exists()


def test_seed_style_embed_command_with_two_processes(tmp_path):
    config = tiny_config(tmp_path, n=30, dataset={"val_size": 4, "test_size": 4})
    cfg_path = write_config(tmp_path / "config.yaml", **config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29518", "-m", "ptm_mamba", "embed", "--config", str(cfg_path),
                             "--output_dir", str(tmp_path / "emb"), "--batch_size", "8"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for split, n in (("train", 22), ("val", 4), ("test", 4)):
        store = EmbeddingReader(split_store_path(tmp_path / "emb", split))
        assert len(store) == n
        assert store.attrs["split"] == split
    assert sorted(p.name for p in (tmp_path / "emb" / "split").iterdir()) == \
        sorted(p.name for p in split_paths(tmp_path / "emb" / "split").values())
