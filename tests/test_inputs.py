"""Hostile or sloppy inputs: config strings, duplicate keys, run names, predict paths, crafted checkpoints.

Each case goes through the real CLI where there is one and must end with exit 2, one
``error:`` line naming the problem, no traceback, and nothing written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SEQS, error_line, run_cli, write_config
from ptm_mamba.config import load_config, load_yaml_strict, validate
from ptm_mamba.embedding_store import EmbeddingReader
from ptm_mamba.errors import PipelineError
from ptm_mamba.checkpoint import load_model


def config_text(toy_config: Path, extra: str) -> str:
    """The toy config's text with ``extra`` YAML lines appended."""
    return toy_config.read_text() + extra


# --- config values given as strings


def test_exponent_without_dot_is_a_number(toy_config: Path, tmp_path: Path):
    """YAML 1.1 reads `lr: 1e-3` as the string "1e-3"; the schema wants a number, so it becomes one."""
    toy_config.write_text(config_text(toy_config, "training:\n  lr: 1e-3\n  adam_betas: [0.9, 9e-1]\n"))
    config = load_config(toy_config)
    assert config["training"]["lr"] == 0.001 and isinstance(config["training"]["lr"], float)
    assert config["training"]["adam_betas"] == [0.9, 0.9]
    result = run_cli("split", "--config", toy_config, "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr


def test_validate_converts_strings_where_the_schema_wants_other_types():
    """What `snakemake --config 'training={lr: 0.1, ...}'` passes (yaml BaseLoader: all strings)."""
    config = {
        "run_name": "007",
        "seed": "7",
        "dataset": {"dataset_location": "d.csv", "val_size": "0.1", "test_size": "5", "id_column_name": "null"},
        "training": {"lr": "0.1", "use_esm": "false", "use_precomputed_embeddings": "Yes", "max_steps": "null",
                     "adam_betas": "[0.9, 0.95]", "warmup_steps": "1e2", "weight_decay": "0"},
        "model": "{d_model: '32', ssm_cfg: {d_state: '4'}}",
        "embedding": {"batch_size": "~"},
        "esm": {"model": "esm2_t6_8M_UR50D", "repr_layer": "None"},
    }
    same = validate(config)
    assert same is config
    tr = config["training"]
    assert (tr["lr"], tr["use_esm"], tr["use_precomputed_embeddings"], tr["max_steps"]) == (0.1, False, True, None)
    assert tr["adam_betas"] == [0.9, 0.95] and tr["warmup_steps"] == 100 and tr["weight_decay"] == 0
    assert tr["num_train_epochs"] == 10  # defaults still filled
    assert config["run_name"] == "007" and config["seed"] == 7  # a string stays a string where one is wanted
    assert config["dataset"] == {**config["dataset"], "val_size": 0.1, "test_size": 5, "id_column_name": None}
    assert config["model"]["d_model"] == 32 and config["model"]["ssm_cfg"] == {"d_state": 4}
    assert config["model"]["n_layer"] == 24
    assert config["embedding"]["batch_size"] is None and config["esm"]["repr_layer"] is None
    listed = validate({"dataset": {"dataset_location": "d.csv"}, "training": {"adam_betas": ["0.8", "0.9"]}})
    assert listed["training"]["adam_betas"] == [0.8, 0.9]


@pytest.mark.parametrize("section, parts", [
    ({"lr": "abc"}, ["training.lr: 'abc' is not a number"]),
    ({"max_steps": "3.5"}, ["training.max_steps: '3.5' is not an integer"]),
    ({"use_esm": "maybe"}, ["training.use_esm: 'maybe'"]),
    ({"adam_betas": "[0.9, x]"}, ["training.adam_betas", "'x' is not a number"]),
    ({"lr": "-1e-3"}, ["training.lr: -0.001", "minimum"]),
])
def test_unconvertible_string_is_refused_in_one_line(section, parts, toy_config: Path, tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", **load_yaml_strict(toy_config), training=section)
    out = tmp_path / "out"
    line = error_line(run_cli("split", "--config", config, "--output_dir", out), str(config), *parts)
    assert len(line) < 200
    assert not out.exists()


# --- duplicate keys


@pytest.mark.parametrize("extra, key, line, first", [
    ("seed: 1\nseed: 2\n", "seed", 2, 1),
    ("training:\n  lr: 0.1\n  warmup_steps: 3\n  lr: 0.2\n", "lr", 4, 2),
])
def test_duplicate_key_is_refused_naming_the_line(extra, key, line, first, toy_config: Path, tmp_path: Path):
    base = len(toy_config.read_text().splitlines())
    toy_config.write_text(config_text(toy_config, extra))
    out = tmp_path / "out"
    expected = f"{toy_config} line {base + line}: duplicate key {key!r} (first at line {base + first})"
    error_line(run_cli("split", "--config", toy_config, "--output_dir", out), expected)
    assert not out.exists()


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path):
    path = tmp_path / "m.yaml"
    path.write_text("base: &b {lr: 0.1, warmup_steps: 2}\ntraining:\n  <<: *b\n  lr: 0.2\n")
    assert load_yaml_strict(path)["training"] == {"lr": 0.2, "warmup_steps": 2}


# --- run names


@pytest.mark.parametrize("name", ["../..", ".", ".hidden", "a/b"])
def test_train_refuses_a_run_name_that_is_not_a_plain_folder_name(name, toy_config: Path, tmp_path: Path):
    outputs = tmp_path / "outputs"
    config = write_config(tmp_path / "c.yaml", **load_yaml_strict(toy_config),
                          training={"output_dir": str(outputs)})
    result = run_cli("train", "--config", config, "--run_name", name, "--no_progress", cwd=tmp_path)
    error_line(result, "--run_name", f"run_name: {name!r}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "config.yaml", "data.csv"]


def test_config_run_name_with_dots_is_refused(toy_config: Path):
    with pytest.raises(PipelineError, match=r"run_name: '\.\.' does not match"):
        validate({**load_yaml_strict(toy_config), "run_name": ".."})
    assert validate({**load_yaml_strict(toy_config), "run_name": "v1.2-run_3"})["run_name"] == "v1.2-run_3"


# --- output folders that are files


def test_an_output_folder_that_is_a_file_is_refused(toy_config: Path, tmp_path: Path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder\n")
    error_line(run_cli("split", "--config", toy_config, "--output_dir", blocker / "split"), str(blocker))
    config = write_config(tmp_path / "c.yaml", **load_yaml_strict(toy_config),
                          training={"output_dir": str(blocker), "use_esm": False, "max_steps": 1})
    error_line(run_cli("train", "--config", config, "--run_name", "r", "--no_progress"), str(blocker))
    assert blocker.read_text() == "a file, not a folder\n"


# --- predict


def fasta(path: Path, prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + "".join(f">{k}\n{v}\n" for k, v in SEQS.items()).encode())
    return path


def predict(checkpoint: Path, input: Path, output: Path):
    return run_cli("predict", "--checkpoint", checkpoint, "--input", input, "--output", output)


def test_predict_refuses_to_overwrite_its_input(checkpoint: Path, tmp_path: Path):
    data = fasta(tmp_path / "in.fasta")
    before = data.read_bytes()
    error_line(predict(checkpoint, data, data), "is the input (", "which this command reads")
    error_line(predict(checkpoint, data, tmp_path / "." / "in.fasta"), "is the input (", "which this command reads")
    (tmp_path / "link.h5").symlink_to(data)
    error_line(predict(checkpoint, data, tmp_path / "link.h5"), "is the input (", "which this command reads")
    assert data.read_bytes() == before


def test_predict_refuses_to_overwrite_its_checkpoint(checkpoint: Path, tmp_path: Path):
    before = checkpoint.read_bytes()
    error_line(predict(checkpoint, fasta(tmp_path / "in.fasta"), checkpoint), "is the checkpoint (", "which this command reads")
    assert checkpoint.read_bytes() == before
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}.tmp-*"))


def test_predict_refuses_a_directory_as_output(checkpoint: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    error_line(predict(checkpoint, fasta(tmp_path / "in.fasta"), out), str(out), "is a directory")
    assert not any(out.iterdir())


@pytest.mark.parametrize("make, parts", [
    (lambda p: p, ["not found", "missing.fasta"]),
    (lambda p: p.mkdir() or p, ["not a file", "missing.fasta"]),
])
def test_predict_refuses_missing_or_directory_input(make, parts, checkpoint: Path, tmp_path: Path):
    out = tmp_path / "o.h5"
    error_line(predict(checkpoint, make(tmp_path / "missing.fasta"), out), *parts)
    assert not out.exists()


def test_predict_reads_fasta_with_bom_and_refuses_non_utf8(checkpoint: Path, tmp_path: Path):
    out = tmp_path / "o.h5"
    result = predict(checkpoint, fasta(tmp_path / "bom.fasta", b"\xef\xbb\xbf"), out)
    assert result.returncode == 0, result.stderr
    assert sorted(EmbeddingReader(out).ids) == ["a", "b"]

    latin = tmp_path / "latin.fasta"
    latin.write_bytes(b">a\nMKV\n>b caf\xe9\nMKL\n")
    out2 = tmp_path / "o2.h5"
    error_line(predict(checkpoint, latin, out2), str(latin), "line 3", "not UTF-8", "0xe9")
    assert not out2.exists()


def crafted(checkpoint: Path, path: Path, edit) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


def _reshape_in_proj(state):
    key = next(k for k in state["model"] if k.endswith("mixer.in_proj.weight"))
    state["model"][key] = torch.zeros(3, 5)


def _add_key(state):
    state["model"]["backbone.extra.weight"] = torch.zeros(2)


def _drop_key(state):
    del state["model"]["backbone.norm_f.weight"]


def _bad_config(value):
    return lambda state: state["model_config"].update(d_model=value)


@pytest.mark.parametrize("edit, parts", [
    (_reshape_in_proj, ["weights do not fit the model", "size mismatch for backbone.", "mixer.in_proj.weight"]),
    (_add_key, ["weights do not fit the model", "Unexpected key", "backbone.extra.weight"]),
    (_drop_key, ["weights do not fit the model", "Missing key", "backbone.norm_f.weight"]),
    (_bad_config("sixteen"), ["cannot build its model"]),
    (_bad_config(-4), ["cannot build its model"]),
    (_bad_config(10**6), ["weights do not fit the model", "size mismatch"]),  # no 10^6-wide model is allocated
    (lambda state: state.update(model_config=[1]), ["model_config", "not a mapping"]),
    (lambda state: state["model"].update(x=3), ["'model' is not a mapping of names to tensors"]),
])
def test_crafted_checkpoint_is_refused_in_one_line(edit, parts, checkpoint: Path, tmp_path: Path):
    bad = crafted(checkpoint, tmp_path / "crafted.ckpt", edit)
    out = tmp_path / "o.h5"
    line = error_line(predict(bad, fasta(tmp_path / "in.fasta"), out), str(bad), *parts)
    assert len(line) < len(str(bad)) + 260
    assert not out.exists()
    with pytest.raises(PipelineError, match=parts[0]):
        load_model(bad)


def test_predict_batch_budget_below_the_schemas_minimum_is_one_line(tmp_path):
    """--max_tokens_per_batch has the bound of its config key, predict.max_tokens_per_batch."""
    result = run_cli("predict", "--checkpoint", tmp_path / "x.ckpt", "--input", tmp_path / "in.fasta",
                     "--output", tmp_path / "out.h5", "--max_tokens_per_batch", "0")
    error_line(result, "--max_tokens_per_batch: 0 is less than the minimum of 8")
    assert not (tmp_path / "out.h5").exists()


def test_reading_a_csv_without_a_config_takes_the_schemas_defaults():
    """read_dataset's keyword defaults (a predict CSV, a split file) are the dataset section's."""
    import inspect

    from ptm_mamba.config import schema_default
    from ptm_mamba.dataset import read_dataset

    defaults = {name: p.default for name, p in inspect.signature(read_dataset).parameters.items()}
    assert defaults["sequence_column"] == schema_default("dataset.sequence_column_name")
    assert defaults["id_column"] == schema_default("dataset.id_column_name")
    assert defaults["unknown_ptm"] == schema_default("dataset.unknown_ptm")
