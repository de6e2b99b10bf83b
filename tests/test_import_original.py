"""`ptm-mamba import-original`: a checkpoint written the way the original's train.py writes it
({"model": state_dict, "config": OmegaConf DictConfig}, with the bundled mamba-ssm fork's unused
*_b mixer tensors) becomes ours; the imported model computes what the original network computes
from that state dict; `ptm-mamba predict` runs on it (per-residue and pooled embeddings). Also a
file written under real hydra-core 1.3.2 / omegaconf 2.3.0 (tests/fixtures/original); a file that
pickles any other global is refused, in one line naming it."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig, OmegaConf

from conftest import REPO, SEQS, run_cli
from ptm_mamba.checkpoint import load_model
from ptm_mamba.errors import PipelineError
from ptm_mamba.model import ModelConfig, PTMMamba
from ptm_mamba.original import import_original
from ptm_mamba.predict import predict, read_pooled, write_predictions
from ptm_mamba.scan import selective_scan_ref
from ptm_mamba.testing import write_tiny_esm2_checkpoint
from ptm_mamba.tokenizer import FIRST_RESIDUE_ID, VOCAB

D_MODEL, N_LAYER, D_STATE, D_CONV, ESM_DIM = 16, 2, 4, 4, 16
D_INNER, DT_RANK = 2 * D_MODEL, math.ceil(D_MODEL / 16)
# The original's protein_lm/configs/train/base.yaml, at a tiny size, under hydra's "train" group.
BASE_YAML = f"""
seed: 42
report_to: "none"
dataset: {{dataset: ptm, dataset_type: csv, dataset_loc: protein_lm/dataset/ptm_labels.csv, split_seed: 2,
           val_size: 100, test_size: 0, sequence_column_name: ori_seq, max_sequence_length: 1024}}
training_arguments: {{save_dir: checkpoints/ptm-mamba, num_train_epochs: 3000, lr: 2.0e-4,
                      per_device_train_batch_size: 256, use_esm: true, max_tokens_per_batch: 80000,
                      log_steps: 100, max_sequence_length: null}}
model:
  model_type: bidirectional_mamba
  d_model: {D_MODEL}
  n_layer: {N_LAYER}
  vocab_size: null
  ssm_cfg: {{d_state: {D_STATE}}}
  rms_norm: true
  residual_in_fp32: true
  fused_add_norm: true
  esm_embed_dim: {ESM_DIM}
  pretrained_checkpoint: null
"""
# The fork's mixer parameters that bimamba_type "v1" never uses, with their shapes.
UNUSED = {"A_b_log": (D_INNER, D_STATE), "conv1d_b.weight": (D_INNER, 1, D_CONV), "conv1d_b.bias": (D_INNER,),
          "x_proj_b.weight": (DT_RANK + 2 * D_STATE, D_INNER), "dt_proj_b.weight": (D_INNER, DT_RANK),
          "dt_proj_b.bias": (D_INNER,), "D_b": (D_INNER,)}


def original_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A trained-looking state dict under the original's names: ours (the same names) with every
    tensor perturbed, plus each mixer's *_b tensors, the tied embedding/LM head one tensor."""
    torch.manual_seed(seed)
    model = PTMMamba(ModelConfig(d_model=D_MODEL, n_layer=N_LAYER, esm_dim=ESM_DIM, ssm_cfg={"d_state": D_STATE}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor
        if name.endswith(".mixer.out_proj.weight"):
            prefix = name.removesuffix("out_proj.weight")
            state.update({prefix + k: torch.randn(shape) for k, shape in UNUSED.items()})
    return state


def original_config(**model) -> DictConfig:
    """The model config as train.py saves it: config_dict.model of hydra's DictConfig, vocab_size set."""
    root = OmegaConf.create({"train": yaml.safe_load(BASE_YAML)})
    config_dict = root["train"]
    config_dict.model.vocab_size = len(VOCAB)  # train.py: config_dict.model.vocab_size = tokenizer.get_vocab_size()
    for key, value in model.items():
        config_dict.model[key] = value
    return config_dict.model


def hydra_config() -> DictConfig:
    """original_config() as it is under hydra: its root's cached `now` resolver was used (hydra's run
    directory), the parents interpolate `now` and other keys, model keys interpolate others; `now` is
    unregistered again afterwards, as in a process without hydra."""
    with warnings.catch_warnings():  # omegaconf 2.4 deprecates the call hydra 1.3 makes
        warnings.simplefilter("ignore")
        OmegaConf.register_new_resolver("now", lambda fmt: datetime.datetime.now().strftime(fmt), use_cache=True)
    try:
        model = original_config(n_layer="${..depth}", esm_embed_dim="${train.esm_dim}")
        root = model._get_root()
        root.run_dir = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"
        root.train.merge_with({"depth": N_LAYER, "esm_dim": ESM_DIM,
                               "training_arguments": {"save_dir": "${run_dir}/checkpoints-${now:%Y}"}})
        assert root.train.training_arguments.save_dir.startswith("outputs/")  # train.py reads it: cached
        assert set(OmegaConf.get_cache(root)["now"]) == {("%Y-%m-%d",), ("%H-%M-%S",), ("%Y",)}
    finally:
        OmegaConf.clear_resolver("now")
    return model


def save_original(path, state=None, config=None, **extra):
    torch.save({"model": state or original_state_dict(), "config": config or original_config(), **extra}, path)
    return path


@pytest.fixture(scope="module")
def tiny_esm(tmp_path_factory):
    return write_tiny_esm2_checkpoint(tmp_path_factory.mktemp("esm") / "esm2_t2_16.pt", 2, ESM_DIM, 2)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_esm):
    """(original file, imported checkpoint) through the real CLI, as its own process."""
    root = tmp_path_factory.mktemp("import")
    source = save_original(root / "best.ckpt")
    result = run_cli("import-original", "--checkpoint", source, "--output", root / "imported.ckpt",
                     "--esm-model", tiny_esm, own_process=True)
    assert result.returncode == 0, result.stderr
    assert f"{N_LAYER * 2 * len(UNUSED)} unused *_b mixer tensors dropped" in result.stdout
    return source, root / "imported.ckpt"


# ----------------------------------------------------------------------------- the original network

def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def original_mixer(sd, p, h):
    """mamba_simple.Mamba.forward's path without fused kernels, from the state dict."""
    seq_len = h.shape[1]
    x, z = (h @ sd[p + "in_proj.weight"].T).transpose(1, 2).chunk(2, dim=1)
    x = F.silu(F.conv1d(x, sd[p + "conv1d.weight"], sd[p + "conv1d.bias"], padding=D_CONV - 1,
                        groups=D_INNER)[..., :seq_len])
    dt, B, C = (x.transpose(1, 2) @ sd[p + "x_proj.weight"].T).split([DT_RANK, D_STATE, D_STATE], dim=-1)
    dt = (dt @ sd[p + "dt_proj.weight"].T).transpose(1, 2)
    y = selective_scan_ref(x, dt, -torch.exp(sd[p + "A_log"]), B.transpose(1, 2), C.transpose(1, 2), sd[p + "D"],
                           z=z, delta_bias=sd[p + "dt_proj.bias"], delta_softplus=True)
    return y.transpose(1, 2) @ sd[p + "out_proj.weight"].T


def original_block(sd, p, hidden, residual):
    residual = hidden if residual is None else hidden + residual
    return original_mixer(sd, p + "mixer.", rms_norm(residual, sd[p + "norm.weight"])), residual


@torch.no_grad()
def original_logits(sd, input_ids, esm_features):
    """lm.py's MambaLMHeadModel(BiDirectionMixerModel).forward, read from the original's state dict:
    esm_head, gate, forward/backward blocks on the flipped batch, hidden_fc, norm_f, tied head."""
    tok = sd["backbone.embedding.weight"][input_ids]
    esm = esm_features @ sd["esm_head.weight"].T
    gate = torch.sigmoid(torch.cat([tok, esm], dim=-1) @ sd["backbone.gate.weight"].T + sd["backbone.gate.bias"])
    hidden, residual = tok * gate + esm * (1 - gate), None
    for i in range(N_LAYER):
        hidden_f, residual_f = original_block(sd, f"backbone.forward_layers.{i}.", hidden, residual)
        hidden_b, residual_b = original_block(sd, f"backbone.backward_layers.{i}.", hidden.flip([1]),
                                              None if residual is None else residual.flip([1]))
        hidden = (torch.cat([hidden_f, hidden_b.flip([1])], dim=-1) @ sd[f"backbone.hidden_fc.{i}.weight"].T
                  + sd[f"backbone.hidden_fc.{i}.bias"])
        residual = 0.5 * (residual_f + residual_b.flip([1]))
    return rms_norm(hidden + residual, sd["backbone.norm_f.weight"]) @ sd["lm_head.weight"].T


def logits_difference(original_file, target) -> float:
    """max |logits of the imported model `target` - the original network's from `original_file`'s
    state dict| on the same random (unpadded: flip == our reversal) inputs."""
    original = torch.load(original_file, weights_only=False)["model"]  # our own test file: a full unpickle is fine
    model = load_model(target).model
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(FIRST_RESIDUE_ID, len(VOCAB), (3, 21), generator=gen)
    esm = torch.randn(3, 21, ESM_DIM, generator=gen)
    with torch.no_grad():
        ours = model(ids, esm).logits
    reference = original_logits(original, ids, esm)
    diff = (ours - reference).abs().max().item()
    print(f"max |imported - original network| logits of {Path(original_file).name}: {diff:.2e} "
          f"(scale {reference.abs().max().item():.2f})")
    return diff


# ----------------------------------------------------------------------------- tests

def test_every_tensor_is_the_files_and_only_the_unused_ones_are_dropped(imported):
    source, target = imported
    original = torch.load(source, weights_only=False)["model"]  # our own test file: a full unpickle is fine
    model = load_model(target).model
    ours = model.state_dict()
    dropped = set(original) - set(ours)
    assert dropped == {f"backbone.{d}_layers.{i}.mixer.{k}" for d in ("forward", "backward")
                       for i in range(N_LAYER) for k in UNUSED}
    assert set(ours) <= set(original)
    for name, tensor in ours.items():
        assert torch.equal(tensor, original[name]), name
    saved = torch.load(target, weights_only=True)  # our format: loads without unpickling code
    assert saved["format_version"] == 1 and sorted(saved["imported_from"]["dropped"]) == sorted(dropped)
    assert saved["imported_from"]["original_config"]["esm_embed_dim"] == ESM_DIM
    assert (model.config.model_type, model.config.d_model, model.config.n_layer, model.config.esm_dim,
            model.config.ssm_cfg) == ("bidirectional_mamba", D_MODEL, N_LAYER, ESM_DIM, {"d_state": D_STATE})


def test_imported_model_computes_the_original_network(imported):
    assert logits_difference(*imported) < 1e-5


def test_a_checkpoint_saved_under_hydra_imports_without_its_resolvers(tiny_esm, tmp_path):
    """The root's resolver cache (a defaultdict), `${now:...}` in the parents with `now` not
    registered here, model keys that interpolate others: read, and only the model's keys resolved."""
    source = save_original(tmp_path / "best.ckpt", config=hydra_config())
    result = run_cli("import-original", "--checkpoint", source, "--output", tmp_path / "imported.ckpt",
                     "--esm-model", tiny_esm)
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "imported.ckpt", weights_only=True)["imported_from"]["original_config"] == {
        **yaml.safe_load(BASE_YAML)["model"], "vocab_size": len(VOCAB)}  # n_layer, esm_embed_dim resolved
    assert logits_difference(source, tmp_path / "imported.ckpt") < 1e-5


def test_a_checkpoint_written_by_hydra_1_3_2_and_omegaconf_2_3_0_imports(tiny_esm, tmp_path):
    source = REPO / "tests" / "fixtures" / "original" / "hydra-1.3.2_omegaconf-2.3.0.ckpt"  # make_checkpoint.py
    result = run_cli("import-original", "--checkpoint", source, "--output", tmp_path / "imported.ckpt",
                     "--esm-model", tiny_esm)
    assert result.returncode == 0, result.stderr
    assert f"{N_LAYER * 2 * len(UNUSED)} unused *_b mixer tensors dropped" in result.stdout
    original_config = torch.load(tmp_path / "imported.ckpt", weights_only=True)["imported_from"]["original_config"]
    assert (original_config["n_layer"], original_config["esm_embed_dim"]) == (N_LAYER, ESM_DIM)  # interpolated
    assert logits_difference(source, tmp_path / "imported.ckpt") < 1e-5


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint pickles: unpickling it runs the command
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("forbidden", ["os.system", "argparse.Namespace"])
def test_a_checkpoint_with_a_forbidden_global_is_refused_in_one_line_naming_it(forbidden, tmp_path):
    marker = tmp_path / "ran"
    payload = RunsACommand(marker) if forbidden == "os.system" else argparse.Namespace(lr=1e-3)
    name = f"{os.system.__module__}.system" if forbidden == "os.system" else forbidden  # posix.system on Linux
    source = save_original(tmp_path / "o.ckpt", config=hydra_config(), extra=payload)
    result = run_cli("import-original", "--checkpoint", source, "--output", tmp_path / "out.ckpt")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{source}: torch.load(weights_only=True): refused global {name};" in result.stderr
    assert not (tmp_path / "out.ckpt").exists() and not marker.exists()


def test_predict_runs_on_the_imported_model_with_pooled_embeddings(imported, tmp_path):
    _, target = imported
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in SEQS.items()))
    out = tmp_path / "hidden.h5"
    result = run_cli("predict", "--checkpoint", target, "--input", fasta, "--output", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    trained = load_model(target)
    expected = predict(trained.model, list(SEQS.values()), esm=trained.esm,  # its own ESM-2
                       trained_esm=trained.trained_esm)
    pooled = read_pooled(out, ["b", "a", "b"])
    for row, key in zip(pooled, ["b", "a", "b"]):
        mean = expected[list(SEQS).index(key)].hidden_states[1:-1].mean(dim=0).numpy()
        np.testing.assert_allclose(row, mean, atol=1e-5, rtol=0)
    with h5py.File(out) as f:
        assert f["pooled"].shape == (2, D_MODEL) and f["pooled"].dtype == np.float32
    bare = tmp_path / "bare.h5"
    write_predictions(target, fasta, bare, device="cpu", pooled=False, progress=False)
    with pytest.raises(PipelineError, match="no pooled embeddings"):
        read_pooled(bare, ["a"])
    with pytest.raises(PipelineError, match="unknown protein id 'zz'"):
        read_pooled(out, ["zz"])


@pytest.mark.parametrize("change,message", [
    (dict(config=dict(model_type="mamba")), "model_type 'mamba': only the original's bidirectional_mamba"),
    (dict(config=dict(ssm_cfg={"d_state": D_STATE, "bimamba_type": "v2"})), "bimamba_type 'v2'"),
    (dict(config=dict(rms_norm=False)), "rms_norm False"),
    (dict(config=dict(vocab_size=60)), "vocab_size 60"),
    (dict(drop="backbone.hidden_fc.1.bias"), "weights do not fit the model.*hidden_fc.1.bias"),
    (dict(untie=True), "lm_head.weight differs from backbone.embedding.weight"),
    (dict(config=dict(d_model="${now:%Y}")), r"config d_model is '\$\{now:%Y\}', not a int"),
    (dict(extra={"when": datetime.date(2024, 1, 1)}), r"weights_only=True\): refused global datetime.date"),
])
def test_checkpoints_that_are_not_the_originals_layout_are_refused(change, message, tmp_path):
    state = original_state_dict()
    if "drop" in change:
        del state[change["drop"]]
    if change.get("untie"):
        state["lm_head.weight"] = state["lm_head.weight"] + 1
    source = save_original(tmp_path / "o.ckpt", state, original_config(**change.get("config", {})),
                           **change.get("extra", {}))
    with pytest.raises(PipelineError, match=message):
        import_original(source, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_refusals_are_one_line_with_exit_2(imported, tmp_path):
    _, target = imported
    result = run_cli("import-original", "--checkpoint", target, "--output", tmp_path / "again.ckpt")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "already a ptm-mamba checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "again.ckpt").exists()
