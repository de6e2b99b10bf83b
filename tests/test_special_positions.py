"""ESM-2 features at <cls>/<eos>, and unknown PTMs (<unk>), checked against the original's way.

The original PTM-Mamba (programmablebio/ptm-mamba, ``compute_esm_embedding`` in its train.py)
decodes the masked ids of a padded batch to text, ``<cls>`` + residues with ``<mask>`` at PTM and
hidden positions + ``<eos>`` + ``<pad>``..., runs fair-esm's batch converter on it, drops the
converter's own ``<cls>``/``<eos>`` and gives the model ESM-2's output at every position. Here that
input is built the same way from the proteins' token strings and run through fair-esm's ``ESM2``
module itself; the features that reach our model, on the fly and precomputed by the real embed
stage into real HDF5 files, must equal its outputs at every position of ``<cls> residues <eos>``,
and be zeros at padding.

An unknown PTM read as ``<unk>`` (``dataset.unknown_ptm: unk``) is a position of the protein that
ESM-2 sees as ``<mask>`` in both modes, that is never predicted and never counted as a PTM site.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import settings_for, tiny_config, write_csv
from ptm_mamba.data import BatchBuilder
from ptm_mamba.dataset import Protein
from ptm_mamba.embed import embed_all, esm_inputs
from ptm_mamba.embedding_store import EmbeddingReader
from ptm_mamba.esm import load_esm_of
from ptm_mamba.forward import esm_features
from ptm_mamba.layout import METRICS_FILE, split_paths, split_store_path
from ptm_mamba.masking import replicate_mask
from ptm_mamba.split import load_split_dir, run_split
from ptm_mamba.tokenizer import PAD_ID, PTM_TOKENS, PTMTokenizer

TOK = PTMTokenizer()
UNKNOWN = ("<Foo>", "<Hydroxy-bar>")  # modifications outside the vocabulary
AA = list("ACDEFGHIKLMNPQRSTVWY")


def protein_rows() -> list[tuple[str, str]]:
    """Proteins with known and unknown PTMs, some of them first or last (next to <cls>/<eos>)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        body = "".join(rng.choice(AA, int(rng.integers(14, 34))))
        seq = body[:3] + "<Phosphoserine>" + body[3:7] + UNKNOWN[i % 2] + body[7:] + "<N6-acetyllysine>"
        if i % 3 == 0:
            seq = UNKNOWN[1] + seq
        if i % 4 == 1:
            seq = seq + UNKNOWN[0]
        rows.append((f"P{i:02d}", seq))
    return rows


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The split and embed stages run for real on proteins with unknown PTMs (dataset.unknown_ptm: unk)."""
    root = tmp_path_factory.mktemp("special")
    data = write_csv(root / "ptm.csv", protein_rows())
    config = tiny_config(root, dataset={"dataset_location": str(data), "val_size": 3, "test_size": 3,
                                        "unknown_ptm": "unk"})
    settings = settings_for(config)
    summary = run_split(settings, root / "split")
    embed_all(settings, root / "split", root / "embeddings")
    splits = load_split_dir(root / "split", settings)
    esm_model = load_esm_of(settings, device="cpu")
    return root, config, summary, splits, esm_model


def store_of(root, split: str) -> EmbeddingReader:
    return EmbeddingReader(split_store_path(root / "embeddings", split))


def builder(config, proteins, *, esm_model=None, store=None, max_sequence_length=1024, mask_prob=None):
    mask_prob = config["training"]["mask_prob"] if mask_prob is None else mask_prob
    return BatchBuilder(proteins, max_sequence_length=max_sequence_length, mask_prob=mask_prob,
                        random_mask_only_prob=0.2, store=store,
                        esm_alphabet=esm_model.alphabet if esm_model is not None else None)


def original_features(esm_model, proteins: list[Protein], hidden: list[np.ndarray]):
    """The original's ESM-2 input (B, T) and features (B, T, dim) for ``proteins`` with residues
    ``hidden`` masked: text built from the token strings, fair-esm's batch converter, fair-esm's ESM2."""
    width = max(p.length for p in proteins) + 2
    texts = []
    for p, h in zip(proteins, hidden):
        # a modification (a PTM token or <unk>) and a hidden residue are <mask> for ESM-2
        body = "".join("<mask>" if h[i] or t.startswith("<") else t for i, t in enumerate(p.tokens))
        texts.append("<cls>" + body + "<eos>" + "<pad>" * (width - 2 - p.length))
    _, _, toks = esm_model.alphabet.get_batch_converter()([(str(i), t) for i, t in enumerate(texts)])
    toks = toks[:, 1:-1]  # as the original: the converter's own <cls>/<eos> off
    layer = esm_model.repr_layer
    with torch.no_grad():
        return toks, esm_model.model(toks, repr_layers=[layer])["representations"][layer]


def both_modes(config, proteins, esm_model, store, **kw):
    """Evaluation batches (mask replicate 0) of ``proteins`` on the fly and precomputed, and their features."""
    indices = list(range(len(proteins)))
    fly = builder(config, proteins, esm_model=esm_model, **kw).build(indices, replicate=0, generator=None)
    pre = builder(config, proteins, store=store, **kw).build(indices, replicate=0, generator=None)
    return fly, pre, esm_features(fly, esm_model), esm_features(pre, None)


def assert_float16_close(stored: torch.Tensor, exact: torch.Tensor) -> None:
    assert stored.dtype == torch.float16
    torch.testing.assert_close(stored.float(), exact, atol=2e-3, rtol=1e-3)


def test_features_are_the_originals_at_every_position_in_both_modes(project):
    root, config, _, splits, esm_model = project
    mask_prob = config["training"]["mask_prob"]
    for split, proteins in splits.items():
        fly, pre, on_the_fly, precomputed = both_modes(config, proteins, esm_model, store_of(root, split))
        toks, reference = original_features(esm_model, proteins,
                                             [replicate_mask(p.id, 0, p.length, mask_prob) for p in proteins])
        assert torch.equal(fly.esm_tokens, toks)  # ESM-2's input, <mask> at PTMs, <unk> and hidden residues
        real = fly.labels != PAD_ID
        assert torch.equal(real, toks != esm_model.alphabet.padding_idx)
        # on the fly: fair-esm's outputs at <cls>, every residue and <eos>
        torch.testing.assert_close(on_the_fly[real], reference[real], atol=1e-5, rtol=1e-5)
        assert on_the_fly[:, 0].ne(0).any(-1).all()  # <cls> really carries features
        # precomputed (the same mask replicate): the same batch, the same features to float16 precision
        for field in ("labels", "input_ids", "pred_mask", "lengths"):
            assert torch.equal(getattr(pre, field), getattr(fly, field)), field
        assert_float16_close(precomputed[real], on_the_fly[real])
        ends = torch.arange(len(proteins)), fly.lengths - 1
        assert_float16_close(precomputed[:, 0], on_the_fly[:, 0])  # <cls>
        assert_float16_close(precomputed[ends], on_the_fly[ends])  # <eos>
        assert not on_the_fly[~real].any() and not precomputed[~real].any()  # padding: zeros in both


def window_start(tokens: np.ndarray, labels: torch.Tensor, n: int) -> int:
    """Where the cropped window ``labels[1:n+1]`` starts in the protein's ``tokens``."""
    window = labels[1:n + 1].numpy()
    starts = [s for s in range(len(tokens) - n + 1) if np.array_equal(tokens[s:s + n], window)]
    assert len(starts) == 1
    return starts[0]


def test_cropped_proteins(project):
    """On the fly ESM-2 reads the window between its own <cls>/<eos>, as the original reads its cropped
    text; precomputed, the window's residue rows sit between the whole protein's <cls>/<eos> rows."""
    root, config, _, splits, esm_model = project
    mask_prob, n = config["training"]["mask_prob"], 14
    proteins = splits["train"]
    store = store_of(root, "train")
    fly, pre, on_the_fly, precomputed = both_modes(config, proteins, esm_model, store, max_sequence_length=n + 2)
    tokens = builder(config, proteins).tokens
    cropped, hidden, starts = [], [], []
    for b, p in enumerate(proteins):
        assert p.length > n
        s = window_start(tokens[b], fly.labels[b], n)
        starts.append(s)
        cropped.append(Protein(p.id, "", p.tokens[s:s + n]))
        hidden.append(replicate_mask(p.id, 0, p.length, mask_prob)[s:s + n])
    toks, reference = original_features(esm_model, cropped, hidden)
    assert torch.equal(fly.esm_tokens, toks)
    torch.testing.assert_close(on_the_fly, reference, atol=1e-5, rtol=1e-5)  # no padding: all the same length
    for b, (p, s) in enumerate(zip(proteins, starts)):
        rows = torch.from_numpy(store.get(p.id, 0)[0])
        assert torch.equal(precomputed[b, 0], rows[0]) and torch.equal(precomputed[b, n + 1], rows[-1])
        assert torch.equal(precomputed[b, 1:n + 1], rows[1 + s:1 + s + n])


def site_counts(sequence: str) -> tuple[int, int]:
    """(known, unknown) PTM tokens of a sequence as written."""
    brackets = re.findall(r"<[^>]*>", sequence)
    known = sum(b in PTM_TOKENS for b in brackets)
    return known, len(brackets) - known


def test_unknown_ptm_is_hidden_from_esm_never_predicted_and_not_a_ptm_site(project):
    root, config, summary, splits, esm_model = project
    mask_prob = config["training"]["mask_prob"]
    written = json.loads(split_paths(root / "split")["summary"].read_text())["splits"]
    for split, proteins in splits.items():
        known, unknown = map(sum, zip(*(site_counts(p.sequence) for p in proteins)))
        assert unknown >= len(proteins) and known == 2 * len(proteins)
        assert [p.num_ptms for p in proteins] == [site_counts(p.sequence)[0] for p in proteins]
        assert [p.num_unknown_ptms for p in proteins] == [site_counts(p.sequence)[1] for p in proteins]
        for counts in (summary["splits"][split], written[split]):
            assert (counts["ptm_sites"], counts["unknown_ptm_sites"]) == (known, unknown)

        store = store_of(root, split)
        fly, pre, on_the_fly, precomputed = both_modes(config, proteins, esm_model, store)
        unk = fly.labels == TOK.unk_id
        assert int(unk.sum()) == unknown
        # ESM-2's input is <mask> there, in both modes (the embed stage's mask is what it fed ESM-2)
        assert (fly.esm_tokens[unk] == esm_model.alphabet.mask_idx).all()
        stage_masks = {pid: mask for (pid, _), _, mask, _ in esm_inputs(proteins, 1, mask_prob, TOK)}
        for b, p in enumerate(proteins):
            at = np.flatnonzero([t == "<unk>" for t in p.tokens])
            assert stage_masks[p.id][at].all()
            assert (fly.labels[b, at + 1] == TOK.unk_id).all()
        # ... and the features there are ESM-2's output, the same in both modes
        assert on_the_fly[unk].ne(0).any(-1).all()
        assert_float16_close(precomputed[unk], on_the_fly[unk])

        # never predicted nor hidden from the model, in any mode, even with every residue hidden
        everything = builder(config, proteins, esm_model=esm_model, mask_prob=1.0)
        pre_builder = builder(config, proteins, store=store)
        indices = list(range(len(proteins)))
        batches = [fly, pre, everything.build(indices, replicate=0, generator=None)]
        for seed in range(8):
            for b, replicate in ((everything, 0), (pre_builder, seed % 2)):
                batches.append(b.build(indices, replicate=replicate, generator=torch.Generator().manual_seed(seed)))
        for batch in batches:
            unk = batch.labels == TOK.unk_id
            assert not batch.pred_mask[unk].any()
            assert (batch.input_ids[unk] == TOK.unk_id).all()
        all_hidden = batches[2]
        assert torch.equal(all_hidden.pred_mask, (all_hidden.labels >= TOK.first_residue_id))


@pytest.mark.parametrize("mode", ["precomputed", "on_the_fly"])
def test_training_with_unknown_ptms_runs_in_both_modes(project, tmp_path, mode):
    """unknown_ptm: unk through the real split and embed stages and training: the run completes with
    finite losses, and <unk> is among no per-type PTM result (it is never predicted)."""
    from ptm_mamba.train import train

    root, config, *_ = project
    config = json.loads(json.dumps(config))
    config["training"].update(max_steps=2, log_steps=1, output_dir=str(tmp_path),
                              embeddings_dir=str(root / "embeddings"),
                              use_precomputed_embeddings=mode == "precomputed")
    out = train(settings_for(config), split_dir=str(root / "split"), run_name=mode, progress=False)
    metrics = json.loads((out / METRICS_FILE).read_text())
    losses = [r[key] for r in metrics for key in ("train_loss", "avg_val_loss", "avg_test_loss") if key in r]
    assert len(losses) >= 5 and all(np.isfinite(losses))
    by_type = next(r["test_ptm_acc_by_type"] for r in metrics if "test_ptm_acc_by_type" in r)
    assert by_type and "<unk>" not in by_type and set(by_type) <= set(PTM_TOKENS)
