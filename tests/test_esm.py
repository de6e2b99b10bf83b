"""ESM-2 loading and embeddings, checked against fair-esm's own model on tiny random checkpoints."""

import argparse
import datetime
import io
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from ptm_mamba.errors import PipelineError
from ptm_mamba.esm import embed, esm_forward, load_esm, window_starts
from ptm_mamba.esm_weights import ESM2_NAMES
from ptm_mamba.testing import write_tiny_esm2_checkpoint

AA = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_esm2_checkpoint(tmp_path_factory.mktemp("esm") / "esm2_t2_32_tiny.pt")


@pytest.fixture(scope="module")
def tiny(ckpt):
    return load_esm(str(ckpt))


def random_seq(rng, n):
    return "".join(rng.choice(list(AA), n))


def fair_esm_rows(esm_model, seq_tokens: str, layer=None):
    """fair-esm's representation of one sequence (which may contain <mask>): rows <cls>, residues, <eos>."""
    layer = esm_model.repr_layer if layer is None else layer
    _, _, toks = esm_model.alphabet.get_batch_converter()([("x", seq_tokens)])
    with torch.no_grad():
        out = esm_model.model(toks, repr_layers=[layer])["representations"][layer]
    return out[0].numpy()


def run(esm_model, items, **kw):
    return dict(embed(esm_model, items, progress=False, **kw))


# ----------------------------------------------------------------------------- loading

def test_load_through_fair_esm_with_weights_only(ckpt, monkeypatch):
    real_load = torch.load
    calls = []

    def guarded_load(*args, **kwargs):
        assert kwargs.get("weights_only") is not False, "torch.load called with weights_only=False"
        calls.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded_load)
    m = load_esm(str(ckpt))
    assert len(calls) == 2  # the model file and its contact-regression file
    assert (m.name, m.num_layers, m.embed_dim, m.repr_layer) == ("esm2_t2_32_tiny", 2, 32, 2)
    assert not m.model.training
    assert not any(p.requires_grad for p in m.model.parameters())
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allow-list was scoped


def test_checkpoint_with_other_pickled_classes_is_refused(ckpt, tmp_path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(ckpt)
    data["extra"] = datetime.date(2024, 1, 1)  # not allow-listed: weights_only must refuse it
    bad = tmp_path / "esm2_t2_32_bad.pt"
    torch.save(data, bad)
    shutil.copy(ckpt.with_name("esm2_t2_32_tiny-contact-regression.pt"),
                tmp_path / "esm2_t2_32_bad-contact-regression.pt")
    with pytest.raises(PipelineError, match="cannot load ESM checkpoint .*esm2_t2_32_bad.pt.*datetime"):
        load_esm(str(bad))


def test_repr_layer_default_and_validation(ckpt):
    assert load_esm(str(ckpt), repr_layer=0).repr_layer == 0
    assert load_esm(str(ckpt), repr_layer=1).repr_layer == 1
    for bad in (3, -1):
        with pytest.raises(PipelineError, match=rf"repr_layer {bad} is not in 0\.\.2"):
            load_esm(str(ckpt), repr_layer=bad)


def test_missing_files_and_unknown_names(ckpt, tmp_path):
    with pytest.raises(PipelineError, match="not found: .*esm2_t6_nothere.pt"):
        load_esm(str(tmp_path / "esm2_t6_nothere.pt"))
    lone = tmp_path / "esm2_t2_32_lone.pt"
    shutil.copy(ckpt, lone)
    with pytest.raises(PipelineError, match="needs esm2_t2_32_lone-contact-regression.pt"):
        load_esm(str(lone))
    with pytest.raises(PipelineError, match="unknown ESM model 'esm2_t6_8M'.*esm2_t33_650M_UR50D"):
        load_esm("esm2_t6_8M")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache; every network request is recorded and served from ``served``."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    served, requested = {}, []

    def urlopen(url, timeout=None):
        requested.append(url)
        if url not in served:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return io.BytesIO(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tmp_path / "hub" / "checkpoints", served, requested


def test_offline_and_not_cached(hub):
    folder, _, requested = hub
    with pytest.raises(PipelineError) as err:
        load_esm("esm2_t6_8M_UR50D")
    msg = str(err.value)
    assert "\n" not in msg
    for part in (str(folder), "esm2_t6_8M_UR50D.pt", "esm2_t6_8M_UR50D-contact-regression.pt",
                 "or name the file itself (esm.model in a config, --esm-model for import-original)", "name resolution"):
        assert part in msg
    assert requested == ["https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt"]
    assert list(folder.iterdir()) == []  # no partial download left behind


def test_pretrained_name_from_cache_and_download(ckpt, hub):
    folder, served, requested = hub
    name = "esm2_t6_8M_UR50D"
    base = "https://dl.fbaipublicfiles.com/fair-esm"
    served[f"{base}/models/{name}.pt"] = ckpt.read_bytes()
    served[f"{base}/regression/{name}-contact-regression.pt"] = \
        ckpt.with_name("esm2_t2_32_tiny-contact-regression.pt").read_bytes()
    m = load_esm(name)  # downloads both files into the hub cache
    assert (m.name, m.num_layers) == (name, 2)
    assert sorted(p.name for p in folder.iterdir()) == [f"{name}-contact-regression.pt", f"{name}.pt"]
    served.clear()
    assert load_esm(name, repr_layer=1).repr_layer == 1  # now from the cache, no network
    assert len(requested) == 2
    assert name in ESM2_NAMES


# ----------------------------------------------------------------------------- forward

def test_sdpa_forward_equals_fair_esm_on_padded_batches(tiny):
    rng = np.random.default_rng(0)
    seqs = [random_seq(rng, n) for n in (23, 5, 17, 1)]
    seqs[0] = seqs[0][:4] + "<mask>" + seqs[0][5:10] + "<mask><mask>" + seqs[0][12:]
    _, _, toks = tiny.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    real = toks.ne(tiny.alphabet.padding_idx)
    for layer in range(tiny.num_layers + 1):
        with torch.no_grad():
            ref = tiny.model(toks, repr_layers=[layer])["representations"][layer]
        ours = esm_forward(tiny, toks, layer)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
        for i in range(len(seqs)):  # padding does not change the real positions
            alone = esm_forward(tiny, toks[i:i + 1, : int(real[i].sum())], layer)[0]
            torch.testing.assert_close(ours[i][real[i]], alone, atol=1e-5, rtol=1e-5)


def test_embed_rows_match_fair_esm_and_masks_become_mask_tokens(tiny):
    rng = np.random.default_rng(1)
    seq = random_seq(rng, 30)
    mask = np.zeros(30, bool)
    mask[[3, 10, 11]] = True
    out = run(tiny, [("plain", seq, None), ("masked", seq, mask), ("short", "MK", None)])
    assert set(out) == {"plain", "masked", "short"}
    assert out["plain"].shape == (30 + 2, 32) and out["plain"].dtype == np.float32  # <cls>, residues, <eos>
    np.testing.assert_allclose(out["plain"], fair_esm_rows(tiny, seq), atol=1e-5)
    np.testing.assert_allclose(out["short"], fair_esm_rows(tiny, "MK"), atol=1e-5)
    with_mask = "".join("<mask>" if m else c for c, m in zip(seq, mask))
    np.testing.assert_allclose(out["masked"], fair_esm_rows(tiny, with_mask), atol=1e-5)
    assert np.abs(out["masked"] - out["plain"]).max(axis=1).min() > 1e-3  # every row sees the masks


def test_intermediate_layer(ckpt):
    m = load_esm(str(ckpt), repr_layer=1)
    seq = "MKTAYIAKQRQISFVKSHFSRQ"
    np.testing.assert_allclose(run(m, [("a", seq, None)])["a"], fair_esm_rows(m, seq, 1), atol=1e-5)


def test_window_starts():
    assert window_starts(20, 20, 6) == [0]
    assert window_starts(50, 20, 6) == [0, 10, 20, 30]
    assert window_starts(1500, 1022, 256) == [0, 478]
    for length in range(21, 200, 7):  # full coverage, every neighbour overlap >= 6, windows in range
        s = window_starts(length, 20, 6)
        assert s[0] == 0 and s[-1] == length - 20
        assert all(6 <= a + 20 - b < 20 for a, b in zip(s, s[1:]))


def test_long_sequences_average_overlapping_windows(tiny):
    rng = np.random.default_rng(2)
    long, fits = random_seq(rng, 50), random_seq(rng, 20)
    mask = np.zeros(50, bool)
    mask[[2, 25]] = True
    out = run(tiny, [("long", long, mask), ("fits", fits, None)], window=20, overlap=6, max_tokens_per_batch=50)
    np.testing.assert_allclose(out["fits"], fair_esm_rows(tiny, fits), atol=1e-5)  # L == window: direct
    marked = ["<mask>" if m else c for c, m in zip(long, mask)]
    windows = {start: fair_esm_rows(tiny, "".join(marked[start:start + 20])) for start in (0, 10, 20, 30)}
    total, count = np.zeros((50, 32)), np.zeros(50)
    for start, rows in windows.items():  # window_starts(50, 20, 6); residue rows averaged
        total[start:start + 20] += rows[1:-1]
        count[start:start + 20] += 1
    assert out["long"].shape == (50 + 2, 32)
    np.testing.assert_allclose(out["long"][1:-1], total / count[:, None], atol=1e-5)
    np.testing.assert_allclose(out["long"][0], windows[0][0], atol=1e-5)  # <cls>: the first window's
    np.testing.assert_allclose(out["long"][-1], windows[30][-1], atol=1e-5)  # <eos>: the last window's
    whole = fair_esm_rows(tiny, "".join(marked))  # windowing really changes the context
    assert np.abs(out["long"] - whole).max() > 1e-3


def test_deterministic(tiny):
    rng = np.random.default_rng(3)
    items = [(i, random_seq(rng, n), None) for i, n in enumerate((40, 12, 33, 7))]
    a, b = run(tiny, items, max_tokens_per_batch=100), run(tiny, items, max_tokens_per_batch=100)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_embed_covers_every_key_once_under_a_small_budget(tiny):
    rng = np.random.default_rng(4)
    lengths = [30, 3, 14, 14, 6, 9, 1, 0, 11]  # 30 + 2 tokens > budget of 24
    items = [(f"s{i}", random_seq(rng, n), None) for i, n in enumerate(lengths)]
    got = list(embed(tiny, items, max_tokens_per_batch=24, batch_size=2, progress=False))
    assert sorted(k for k, _ in got) == sorted(k for k, _, _ in items)
    big = run(tiny, items, max_tokens_per_batch=4096)
    for (key, seq, _), n in zip(items, lengths):
        assert dict(got)[key].shape == (n + 2, 32)
        np.testing.assert_allclose(dict(got)[key], big[key], atol=1e-5)


def test_empty_sequence_is_esm_of_cls_eos(tiny):
    """An empty sequence yields ESM-2's 2 rows of ``<cls><eos>``, alone or batched with others."""
    alone = run(tiny, [("empty", "", None)])["empty"]
    assert alone.shape == (2, 32)
    np.testing.assert_allclose(alone, fair_esm_rows(tiny, ""), atol=1e-5)
    batched = run(tiny, [("empty", "", np.zeros(0, bool)), ("other", "MKTAYIAK", None)])["empty"]
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_no_items(tiny):
    assert run(tiny, []) == {}


def test_bad_input_errors(tiny):
    with pytest.raises(PipelineError, match=r"sequence p7: residue 'J' at position 3"):
        run(tiny, [("p7", "MKJ", None)])
    with pytest.raises(PipelineError, match="duplicate sequence key 'a'"):
        run(tiny, [("a", "MK", None), ("a", "MK", None)])
    with pytest.raises(PipelineError, match=r"sequence a: mask has shape \(3,\)"):
        run(tiny, [("a", "MK", np.zeros(3, bool))])
    with pytest.raises(PipelineError, match="overlap must be"):
        run(tiny, [("a", "MK", None)], window=10, overlap=10)
