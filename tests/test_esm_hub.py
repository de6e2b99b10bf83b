"""ESM-2 in the Hugging Face layout (a local folder, or a Hub id through huggingface_hub's cache),
checked against a real transformers EsmModel and against our fair-esm path on the same weights.
No network: the Hub download is replaced by a local stand-in."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import EsmConfig, EsmModel

import huggingface_hub
from ptm_mamba.errors import PipelineError
from ptm_mamba.esm import embed, load_esm
from ptm_mamba.esm_weights import HUB_FILES, esm_identity, model_name
from ptm_mamba.testing import write_tiny_esm2_checkpoint

LAYERS, DIM, HEADS = 2, 32, 4
# Residue strings with <mask> at some positions (PTM sites), of different lengths: a padded batch.
SEQS = {"a": ("MKVLASWYCDEFGHIK", [3, 7]), "b": ("GGADE", [1]), "c": ("PQRSTVWYAC", [])}


def hf_config(**kw) -> EsmConfig:
    """ESM-2's settings (as in facebook/esm2_*'s config.json), tiny."""
    values = dict(vocab_size=33, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=4 * DIM, position_embedding_type="rotary", token_dropout=True, pad_token_id=1,
                  mask_token_id=32, layer_norm_eps=1e-5, emb_layer_norm_before=False, max_position_embeddings=1026)
    return EsmConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def hf_model() -> EsmModel:
    """A random transformers EsmModel; biases and LayerNorms perturbed so none of them is trivial."""
    torch.manual_seed(0)
    model = EsmModel(hf_config(), add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hub_dir(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "esm2_tiny_hf"
    hf_model.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    return folder


def items():
    return [(k, s, np.isin(np.arange(len(s)), m)) for k, (s, m) in SEQS.items()]


def ours(esm_model) -> dict[str, np.ndarray]:
    return dict(embed(esm_model, items(), progress=False))


def transformers_rows(model: EsmModel, alphabet, layer: int, attention_mask: bool = True) -> dict[str, np.ndarray]:
    """transformers' hidden states after ``layer`` (the last: after emb_layer_norm_after, as fair-esm's
    last representation) of the padded batch, per sequence: rows <cls>, residues, <eos>."""
    keys = list(SEQS)
    width = max(len(s) for s, _ in SEQS.values()) + 2
    toks = torch.full((len(keys), width), alphabet.padding_idx)
    for r, k in enumerate(keys):
        seq, masked = SEQS[k]
        ids = [alphabet.mask_idx if i in masked else alphabet.get_idx(c) for i, c in enumerate(seq)]
        toks[r, :len(seq) + 2] = torch.tensor([alphabet.cls_idx, *ids, alphabet.eos_idx])
    mask = (toks != alphabet.padding_idx).long()
    with torch.no_grad():
        out = model(toks, attention_mask=mask if attention_mask else None, output_hidden_states=True)
    hidden = out.last_hidden_state if layer == LAYERS else out.hidden_states[layer]
    return {k: hidden[r, :len(SEQS[k][0]) + 2].numpy() for r, k in enumerate(keys)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("layer", [0, 1, LAYERS])
def test_hub_folder_features_equal_transformers_hidden_states(hf_model, hub_dir, layer):
    esm_model = load_esm(str(hub_dir), repr_layer=layer)
    assert (esm_model.name, esm_model.num_layers, esm_model.embed_dim) == ("esm2_tiny_hf", LAYERS, DIM)
    diff = max_diff(ours(esm_model), transformers_rows(hf_model, esm_model.alphabet, layer))
    print(f"layer {layer}: max |ours - transformers| = {diff:.2e}")
    assert diff < 1e-5


def test_transformers_counts_padding_as_length_without_the_attention_mask(hf_model, hub_dir):
    """Token dropout scales by the <mask> fraction of the sequence; transformers takes the padded
    length when given no attention mask, so only the masked call is comparable (we pass the mask)."""
    esm_model = load_esm(str(hub_dir))
    unmasked = transformers_rows(hf_model, esm_model.alphabet, LAYERS, attention_mask=False)
    assert np.abs(unmasked["b"] - ours(esm_model)["b"]).max() > 1e-3


def fair_to_hf(fair: dict[str, torch.Tensor], hf_names) -> dict[str, torch.Tensor]:
    """fair-esm ESM2 weights under transformers' EsmModel names (written out from both models' code)."""
    sd = {"embeddings.word_embeddings.weight": fair["embed_tokens.weight"]}
    for name in hf_names:  # one model-level buffer (transformers 5), or one per layer (4.x)
        if name.endswith("rotary_embeddings.inv_freq"):
            sd[name] = fair["layers.0.self_attn.rot_emb.inv_freq"]
    for wb in ("weight", "bias"):
        sd[f"encoder.emb_layer_norm_after.{wb}"] = fair[f"emb_layer_norm_after.{wb}"]
        sd[f"contact_head.regression.{wb}"] = fair[f"contact_head.regression.{wb}"]
        for i in range(LAYERS):
            for hf, fe in (("attention.self.query", "self_attn.q_proj"), ("attention.self.key", "self_attn.k_proj"),
                           ("attention.self.value", "self_attn.v_proj"), ("attention.output.dense", "self_attn.out_proj"),
                           ("attention.LayerNorm", "self_attn_layer_norm"), ("intermediate.dense", "fc1"),
                           ("output.dense", "fc2"), ("LayerNorm", "final_layer_norm")):
                sd[f"encoder.layer.{i}.{hf}.{wb}"] = fair[f"layers.{i}.{fe}.{wb}"]
    return sd


def test_hub_folder_equals_fair_esm_checkpoint_with_the_same_weights(tmp_path):
    fair = load_esm(str(write_tiny_esm2_checkpoint(tmp_path / "esm2_t2_tiny.pt", LAYERS, DIM, HEADS)))
    hf = EsmModel(hf_config(), add_pooling_layer=False).eval()
    missing, unexpected = hf.load_state_dict(fair_to_hf(fair.model.state_dict(), hf.state_dict()), strict=False)
    assert (missing, unexpected) == ([], [])  # every transformers weight set from fair-esm's
    # the name table above is right: transformers computes what fair-esm computes
    assert max_diff(transformers_rows(hf, fair.alphabet, LAYERS), ours(fair)) < 1e-5
    hf.save_pretrained(tmp_path / "hf")
    for layer in (1, LAYERS):
        from_hub = load_esm(str(tmp_path / "hf"), repr_layer=layer)
        from_pt = load_esm(str(tmp_path / "esm2_t2_tiny.pt"), repr_layer=layer)
        assert max_diff(ours(from_hub), ours(from_pt)) < 1e-6


class FakeHub:
    """huggingface_hub.snapshot_download without a network: serves ``source`` as the repository."""

    def __init__(self, cache, source=None):
        self.cache, self.source, self.calls = cache, source, []

    def __call__(self, repo_id, allow_patterns=None, local_files_only=False, **kw):
        self.calls.append((repo_id, tuple(allow_patterns or ()), local_files_only))
        snapshot = self.cache / repo_id.replace("/", "--")
        if local_files_only:
            if not snapshot.is_dir():
                raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
            return str(snapshot)
        if self.source is None:
            raise ConnectionError("Failed to resolve 'huggingface.co' ([Errno -3] Temporary failure in name resolution)")
        shutil.copytree(self.source, snapshot)
        return str(snapshot)


def test_hub_id_is_fetched_once_into_the_cache_then_read_from_it(hf_model, hub_dir, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "cache", hub_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    repo = "facebook/esm2_t6_8M_UR50D"
    esm_model = load_esm(repo)
    assert esm_model.name == model_name(repo) == repo
    assert [c[2] for c in hub.calls] == [True, False]  # the cache first, then the download
    assert all(c[:2] == (repo, tuple(HUB_FILES)) for c in hub.calls)
    assert not any(p.endswith((".bin", ".h5", ".msgpack")) for p in HUB_FILES)  # no pickles fetched
    assert max_diff(ours(esm_model), transformers_rows(hf_model, esm_model.alphabet, LAYERS)) < 1e-5
    hub.calls.clear()
    load_esm(repo)
    assert [c[2] for c in hub.calls] == [True]  # cached: no network


def test_hub_id_offline_and_not_cached_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path / "cache"))
    with pytest.raises(PipelineError) as err:
        load_esm("facebook/esm2_t6_8M_UR50D")
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("facebook/esm2_t6_8M_UR50D", "name resolution", "hf download facebook/esm2_t6_8M_UR50D",
                 huggingface_hub.constants.HF_HUB_CACHE, "esm.model: /path/to/a/folder"):
        assert part in msg


def test_content_identity_of_a_local_hub_folder(hub_dir, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(hub_dir, copy)
    identity = esm_identity(str(copy))
    assert identity.startswith("sha256:") and identity == esm_identity(str(hub_dir))  # content, not place
    (copy / "README.md").write_text("not part of the model")
    assert esm_identity(str(copy)) == identity
    for name in ("config.json", "model.safetensors"):
        changed = tmp_path / f"changed-{name}"
        shutil.copytree(hub_dir, changed)
        with open(changed / name, "ab") as fh:
            fh.write(b" ")
        assert esm_identity(str(changed)) != identity, name
    assert esm_identity("facebook/esm2_t6_8M_UR50D") == "facebook/esm2_t6_8M_UR50D"


def test_folders_that_are_not_esm2_are_refused(hub_dir, tmp_path):
    absolute = tmp_path / "esm1b_like"
    EsmModel(hf_config(position_embedding_type="absolute"), add_pooling_layer=False).save_pretrained(absolute)
    with pytest.raises(PipelineError, match="esm1b_like: not an ESM-2 model: position_embedding_type 'absolute'"):
        load_esm(str(absolute))
    pickled = tmp_path / "bin_only"
    pickled.mkdir()
    shutil.copy(hub_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PipelineError, match="bin_only: cannot read model.safetensors"):
        load_esm(str(pickled))
    with pytest.raises(PipelineError, match="unknown ESM model 'esm2_t6_8M'.*Hugging Face Hub id"):
        model_name("esm2_t6_8M")
