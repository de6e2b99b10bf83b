"""Inference: predict() on checkpoint.load_model(...) and `ptm-mamba predict` on a trained tiny run."""

from __future__ import annotations

import numpy as np
import torch

from conftest import SEQS, run_cli
from ptm_mamba.embedding_store import EmbeddingReader
from ptm_mamba.checkpoint import load_model
from ptm_mamba.predict import predict


def test_a_loaded_checkpoint_predicts_with_its_own_esm(checkpoint):
    trained = load_model(checkpoint)
    model, its_esm = trained.model, dict(esm=trained.esm, trained_esm=trained.trained_esm)
    outs = predict(model, list(SEQS.values()), **its_esm)
    for out, seq_len in zip(outs, (10, 8)):
        assert out.logits.shape == (seq_len + 2, 59)
        assert out.hidden_states.shape == (seq_len + 2, 16)
    # alone or batched with a longer protein: the same result (per-sequence reversal, no leakage of padding)
    alone = predict(model, [SEQS["b"]], **its_esm)[0]
    assert torch.allclose(alone.logits, outs[1].logits, atol=1e-5)


def test_predict_cli_writes_hidden_states_per_residue(checkpoint, tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{k} some description\n{v[:5]}\n{v[5:]}\n" for k, v in SEQS.items()))
    out = tmp_path / "hidden.h5"
    result = run_cli("predict", "--checkpoint", checkpoint, "--input", fasta, "--output", out,
                     own_process=True)  # the real command, once
    assert result.returncode == 0, result.stderr
    store = EmbeddingReader(out)
    assert sorted(store.ids) == ["a", "b"]
    trained = load_model(checkpoint)
    expected = predict(trained.model, list(SEQS.values()), esm=trained.esm, trained_esm=trained.trained_esm)
    for key, exp in zip(SEQS, expected):
        hidden, _ = store.get(key, 0)
        assert np.allclose(hidden.astype(np.float32), exp.hidden_states.numpy(), atol=2e-2, rtol=1e-2)


def test_predict_cli_refuses_bad_fasta(checkpoint, tmp_path):
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(">a\nMKV\n>a\nMKL\n")
    result = run_cli("predict", "--checkpoint", checkpoint, "--input", fasta, "--output", tmp_path / "o.h5")
    assert result.returncode == 2 and "duplicate id 'a'" in result.stderr and "line 3" in result.stderr
    assert not (tmp_path / "o.h5").exists()
    result = run_cli("predict", "--checkpoint", tmp_path / "missing.ckpt", "--input", fasta,
                     "--output", tmp_path / "o.h5")
    assert result.returncode == 2 and "checkpoint not found" in result.stderr


def test_published_checkpoint_layout_loads(checkpoint, tmp_path):
    """The published model's bundled mamba-ssm fork adds unused *_b mixer parameters: they are dropped."""
    state = torch.load(checkpoint, weights_only=True)
    mixer = next(k for k in state["model"] if k.endswith(".mixer.A_log"))
    state["model"][mixer.replace("A_log", "A_b_log")] = torch.zeros(3)
    state["model"][mixer.replace("A_log", "conv1d_b.weight")] = torch.zeros(3)
    torch.save(state, tmp_path / "published.ckpt")
    model = load_model(tmp_path / "published.ckpt").model
    assert torch.equal(model.state_dict()[mixer], state["model"][mixer])
