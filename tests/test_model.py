"""Tests of the PTM-Mamba network on tiny models with the pure PyTorch mixer."""

from __future__ import annotations

import math

import pytest
import torch

import ptm_mamba.model as model_module
from ptm_mamba.errors import PipelineError
from ptm_mamba.model import PAD_ID, ModelConfig, PTMMamba, reverse_padded
from ptm_mamba.tokenizer import PTMTokenizer, VOCAB

D_MODEL, ESM_DIM = 16, 8
MODEL_TYPES = ["bidirectional_mamba", "mamba"]
FIRST_RESIDUE = PTMTokenizer().first_residue_id


def make_model(model_type: str = "bidirectional_mamba", n_layer: int = 2, seed: int = 0, **kw) -> PTMMamba:
    torch.manual_seed(seed)
    config = ModelConfig(model_type=model_type, d_model=D_MODEL, n_layer=n_layer, esm_dim=ESM_DIM,
                         use_esm=kw.pop("use_esm", True), scan="torch", **kw)
    return PTMMamba(config).eval()


def random_protein(length: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids of residues and PTM tokens (no special tokens), shape (length,)."""
    return torch.randint(FIRST_RESIDUE, len(VOCAB), (length,), generator=gen)


def pad_batch(proteins: list[torch.Tensor], features: list[torch.Tensor], gen: torch.Generator):
    """Right-pad ids with <pad> and ESM features with random junk (padding content must not matter)."""
    seq_len = max(len(p) for p in proteins)
    ids = torch.full((len(proteins), seq_len), PAD_ID, dtype=torch.long)
    esm = torch.randn(len(proteins), seq_len, ESM_DIM, generator=gen) * 5
    for b, (p, f) in enumerate(zip(proteins, features)):
        ids[b, :len(p)] = p
        esm[b, :len(p)] = f
    return ids, esm


def test_reverse_padded_hand_example():
    x = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    lengths = torch.tensor([3, 5, 0])
    expected = torch.tensor([[2, 1, 0, 3, 4], [14, 13, 12, 11, 10], [20, 21, 22, 23, 24]])
    assert torch.equal(reverse_padded(x, lengths), expected)
    # Trailing feature dims follow their position, and the map is its own inverse.
    x3 = torch.stack([x, -x], dim=-1)  # (3, 5, 2)
    out = reverse_padded(x3, lengths)
    assert torch.equal(out[..., 0], expected) and torch.equal(out[..., 1], -expected)
    assert torch.equal(reverse_padded(out, lengths), x3)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_shapes(model_type):
    model = make_model(model_type)
    gen = torch.Generator().manual_seed(1)
    ids, esm = pad_batch([random_protein(7, gen), random_protein(4, gen)],
                         [torch.randn(7, ESM_DIM, generator=gen), torch.randn(4, ESM_DIM, generator=gen)], gen)
    out = model(ids, esm)
    assert out.logits.shape == (2, 7, len(VOCAB))
    assert out.hidden_states.shape == (2, 7, D_MODEL)
    assert torch.isfinite(out.logits).all()
    # Logits are the tied head applied to the returned hidden states.
    torch.testing.assert_close(out.logits, out.hidden_states @ model.backbone.embedding.weight.T)


def test_lm_head_tied_to_embedding_and_stays_tied_after_load():
    model = make_model()
    assert model.lm_head.weight is model.backbone.embedding.weight
    other = make_model(seed=123)
    assert not torch.equal(other.backbone.embedding.weight, model.backbone.embedding.weight)
    model.load_state_dict(other.state_dict(), strict=True)
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model.lm_head.weight.data_ptr() == model.backbone.embedding.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, other.backbone.embedding.weight)
    # The tied tensor is counted once.
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))
    assert model.num_parameters() < sum(t.numel() for t in model.state_dict().values())


MIXER_KEYS = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
              "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"]


def block_keys(prefix: str) -> list[str]:
    return [f"{prefix}.mixer.{k}" for k in MIXER_KEYS] + [f"{prefix}.norm.weight"]


@pytest.mark.parametrize("model_type,expected", [
    ("bidirectional_mamba", [
        "backbone.embedding.weight", "backbone.gate.weight", "backbone.gate.bias",
        *block_keys("backbone.forward_layers.0"), *block_keys("backbone.backward_layers.0"),
        "backbone.hidden_fc.0.weight", "backbone.hidden_fc.0.bias",
        "backbone.norm_f.weight", "lm_head.weight", "esm_head.weight",
    ]),
    ("mamba", [
        "backbone.embedding.weight", "backbone.gate.weight", "backbone.gate.bias",
        *block_keys("backbone.layers.0"),
        "backbone.norm_f.weight", "lm_head.weight", "esm_head.weight",
    ]),
])
def test_state_dict_names_match_checkpoint_layout(model_type, expected):
    assert sorted(make_model(model_type, n_layer=1).state_dict()) == sorted(expected)


def padding_case(model: PTMMamba):
    """Logits of a short protein alone, and in a batch padded to a longer mate's length."""
    gen = torch.Generator().manual_seed(7)
    short, long_ = random_protein(5, gen), random_protein(11, gen)
    f_short, f_long = torch.randn(5, ESM_DIM, generator=gen), torch.randn(11, ESM_DIM, generator=gen)
    with torch.no_grad():
        alone = model(short[None], f_short[None]).logits[0]
        ids, esm = pad_batch([short, long_], [f_short, f_long], gen)
        batched = model(ids, esm).logits[0, :5]
    return alone, batched


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_protein_logits_do_not_depend_on_padding_or_batch_mates(model_type):
    alone, batched = padding_case(make_model(model_type))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def whole_batch_flip(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The original model's reversal: flip the whole padded batch, ignoring lengths."""
    return x.flip(1)


def test_original_whole_batch_flip_fails_the_padding_test(monkeypatch):
    model = make_model()
    monkeypatch.setattr(model_module, "reverse_padded", whole_batch_flip)
    alone, batched = padding_case(model)
    assert (batched - alone).abs().max() > 1e-3


def test_unpadded_batch_matches_original_flip(monkeypatch):
    """Without padding our per-length reversal is exactly the original's flip."""
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    ids = torch.stack([random_protein(9, gen), random_protein(9, gen)])
    esm = torch.randn(2, 9, ESM_DIM, generator=gen)
    with torch.no_grad():
        ours = model(ids, esm).logits
        monkeypatch.setattr(model_module, "reverse_padded", whole_batch_flip)
        original = model(ids, esm).logits
    torch.testing.assert_close(ours, original, atol=1e-6, rtol=0)


def test_lengths_default_to_non_pad_count():
    model = make_model()
    gen = torch.Generator().manual_seed(4)
    ids, esm = pad_batch([random_protein(6, gen), random_protein(3, gen)],
                         [torch.randn(6, ESM_DIM, generator=gen), torch.randn(3, ESM_DIM, generator=gen)], gen)
    with torch.no_grad():
        derived = model(ids, esm).logits
        given = model(ids, esm, lengths=torch.tensor([6, 3])).logits
        wrong = model(ids, esm, lengths=torch.tensor([6, 6])).logits
    torch.testing.assert_close(given, derived, atol=0, rtol=0)
    assert (wrong[1, :3] - derived[1, :3]).abs().max() > 1e-4


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_use_esm_false_equals_zero_esm_features(model_type):
    model = make_model(model_type)
    gen = torch.Generator().manual_seed(5)
    ids = random_protein(8, gen)[None]
    esm = torch.randn(1, 8, ESM_DIM, generator=gen)
    with torch.no_grad():
        with_zeros = model(ids, torch.zeros_like(esm)).logits
        without = model(ids, None).logits
        model.config.use_esm = False
        ignored = model(ids, esm).logits
    torch.testing.assert_close(without, with_zeros, atol=0, rtol=0)
    torch.testing.assert_close(ignored, with_zeros, atol=0, rtol=0)


def test_gate_mixes_token_and_esm_embeddings():
    model = make_model()
    gen = torch.Generator().manual_seed(6)
    ids = random_protein(8, gen)[None]
    esm_a, esm_b = torch.randn(2, 1, 8, ESM_DIM, generator=gen)
    with torch.no_grad():
        out_a, out_b = model(ids, esm_a).logits, model(ids, esm_b).logits
        assert (out_a - out_b).abs().max() > 1e-4
        tok = model.backbone.embedding(ids)
        esm = model.esm_head(esm_a)
        fused, g = model.backbone.fuse(tok, esm)
    assert g.shape == (1, 8, 1)
    assert ((g > 0) & (g < 1)).all()
    assert g.std() > 0  # the gate depends on the position's inputs
    torch.testing.assert_close(fused, g * tok + (1 - g) * esm)


def test_esm_features_of_wrong_shape_are_rejected():
    model = make_model()
    ids = torch.full((1, 4), FIRST_RESIDUE)
    with pytest.raises(PipelineError, match="esm_dim 8"):
        model(ids, torch.zeros(1, 4, ESM_DIM + 1))


def test_param_groups_exclude_a_log_d_biases_and_norms_from_decay():
    model = make_model()
    decay, no_decay = model.param_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    names = {id(p): n for n, p in model.named_parameters()}
    # Every parameter in exactly one group.
    assert ids(decay).isdisjoint(ids(no_decay))
    assert ids(decay) | ids(no_decay) == set(names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    no_decay_names = {names[i] for i in ids(no_decay)}
    for name in names.values():
        leaf = name.rsplit(".", 1)[-1]
        excluded = leaf in ("A_log", "D", "bias") or name.endswith("norm.weight") or name.endswith("norm_f.weight")
        assert (name in no_decay_names) == excluded, name
    assert "backbone.forward_layers.1.mixer.A_log" in no_decay_names
    assert "backbone.backward_layers.0.mixer.D" in no_decay_names
    assert "backbone.embedding.weight" not in no_decay_names
    torch.optim.AdamW(model.param_groups(0.01), lr=1e-3)  # accepted as given


def test_gradients_reach_every_parameter():
    model = make_model().train()
    gen = torch.Generator().manual_seed(8)
    ids, esm = pad_batch([random_protein(9, gen), random_protein(6, gen)],
                         [torch.randn(9, ESM_DIM, generator=gen), torch.randn(6, ESM_DIM, generator=gen)], gen)
    logits = model(ids, esm).logits
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, ignore_index=PAD_ID).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_follows_the_original():
    n_layer = 3
    model = make_model(n_layer=n_layer)
    bb = model.backbone
    assert torch.all(bb.gate.bias == 0)
    for fc in bb.hidden_fc:
        assert torch.all(fc.bias == 0)
    # dt_proj's bias is tagged _no_reinit: it keeps its softplus-inverse init.
    assert bb.forward_layers[0].mixer.dt_proj.bias.abs().min() > 0
    assert 0.015 < bb.embedding.weight.std().item() < 0.025
    out_proj = bb.forward_layers[0].mixer.out_proj.weight
    bound = 1 / math.sqrt(out_proj.shape[1]) / math.sqrt(n_layer)
    assert bound / 2 < out_proj.abs().max().item() <= bound


def test_config_round_trip_and_errors():
    config = ModelConfig(model_type="mamba", d_model=32, n_layer=2, esm_dim=8, use_esm=False,
                         ssm_cfg={"d_state": 8}, scan="torch")
    plain = config.to_dict()
    assert plain["vocab_size"] == len(VOCAB) == 59
    assert ModelConfig.from_dict(plain) == config
    # Older checkpoints: no scan (the default), or under its old name, backend.
    assert ModelConfig.from_dict({k: v for k, v in plain.items() if k != "scan"}).scan == "auto"
    legacy = {**{k: v for k, v in plain.items() if k != "scan"}, "backend": "torch"}
    assert ModelConfig.from_dict(legacy) == config
    with pytest.raises(PipelineError, match="d_modle"):
        ModelConfig.from_dict({**plain, "d_modle": 3})
    with pytest.raises(PipelineError, match="transformer"):
        ModelConfig(model_type="transformer")
    # ssm_cfg reaches the mixer.
    model = PTMMamba(config)
    assert model.backbone.layers[0].mixer.A_log.shape[-1] == 8


def test_defaults_are_the_config_schemas():
    """ModelConfig's literal defaults (the model core reads no schema) are the schema's model.* defaults."""
    from dataclasses import fields

    from ptm_mamba.config import load_schema

    schema = load_schema()["properties"]["model"]["properties"]
    assert set(schema) <= {f.name for f in fields(ModelConfig)}
    defaults = ModelConfig()
    for key, entry in schema.items():
        assert getattr(defaults, key) == entry["default"], key
