"""Files a stage reads are checked as they are read, through the real CLI (one line, exit 2):

- the cluster stage's clusters.tsv (made by the real mmseqs, then edited by hand): a protein moved to
  another cluster, a line removed or repeated, an id the dataset lacks, a damaged row, a first line
  without its content hash or with another count, the file of another dataset;
- checkpoints with NaN/Inf weights, refused by every reader (predict, training.init_from,
  training.resume_from_checkpoint, checkpoint.load_model), naming the file and the tensor.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DEMO, SEQS, error_line, run_cli, write_config, write_csv
from ptm_mamba.cluster import HASH_KEY, HEADER
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import BEST_CKPT, LAST_CKPT, run_dir
from ptm_mamba.checkpoint import load_model

needs_mmseqs = pytest.mark.skipif(shutil.which("mmseqs") is None, reason="needs mmseqs (scripts/install_mmseqs.sh)")


# ----------------------------------------------------------------------------- clusters.tsv


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> dict:
    """30 unrelated short demo proteins and two homolog families (5 each), clustered by the real
    cluster stage; and a second data set (the same minus one protein) with its own clusters file."""
    root = tmp_path_factory.mktemp("trust-clusters")
    with open(DEMO, newline="") as fh:
        rows = [tuple(row) for row in csv.reader(fh)][1:]
    data = [row for row in rows[:2000] if len(row[1]) < 300][:30] + rows[2000:2010]
    made = {}
    for name, subset in (("data", data), ("other", data[1:])):
        path = write_csv(root / f"{name}.csv", subset)
        config = write_config(root / f"{name}.yaml", dataset={
            "dataset_location": str(path), "val_size": 3, "test_size": 3, "split_by": "cluster"})
        tsv = root / f"{name}.clusters.tsv"
        result = run_cli("cluster", "--config", config, "--output", tsv, "--threads", "1")
        assert result.returncode == 0, result.stderr
        made[name] = {"config": config, "tsv": tsv, "ids": [row[0] for row in subset]}
    return {"root": root, **made}


def split(config: Path, tsv: Path, out: Path):
    return run_cli("split", "--config", config, "--output_dir", out, "--clusters", tsv, "--threads", "1")


@needs_mmseqs
def test_the_clusters_file_records_its_count_and_content_hash(clustered, tmp_path):
    tsv = clustered["data"]["tsv"]
    first, columns, *rows = tsv.read_text().splitlines()
    record = json.loads(first[len(HEADER):])
    assert record["proteins"] == len(rows) == 40 and record["clusters"] == len({r.split("\t")[0] for r in rows})
    assert record[HASH_KEY].startswith("sha256:")
    result = split(clustered["data"]["config"], tsv, tmp_path / "out")  # the file as written is read
    assert result.returncode == 0, result.stderr


def _edit(tsv: Path, out: Path, edit) -> Path:
    first, *body = tsv.read_text().splitlines()
    first, body = edit(first, body)
    out.write_text("\n".join([first, *body]) + "\n")
    return out


def _move_one(first, body):
    """A protein (not the one naming its cluster) moved to another cluster, the rows kept sorted."""
    rows = [line.split("\t") for line in body[1:]]
    names = sorted({c for c, _ in rows})
    i = next(i for i, (c, p) in enumerate(rows) if c != p)
    rows[i][0] = next(n for n in names if n != rows[i][0])
    return first, [body[0], *sorted("\t".join(r) for r in rows)]


def _split_off(first, body):
    """A protein (not the one naming its cluster) moved to a new cluster of its own."""
    i = next(i for i, line in enumerate(body) if i and line.split("\t")[0] != line.split("\t")[1])
    pid = body[i].split("\t")[1]
    return first, [*body[:i], f"{pid}\t{pid}", *body[i + 1:]]


def _record(update):
    def edit(first, body):
        record = json.loads(first[len(HEADER):])
        update(record)
        return HEADER + json.dumps(record, sort_keys=True), body
    return edit


@needs_mmseqs
@pytest.mark.parametrize("edit, parts", [
    (_move_one, ["its rows are not those the cluster stage wrote", "a protein moved to another cluster",
                 "rerun the cluster stage"]),
    (lambda f, b: (f, b[:-1]), ["does not name each protein of the dataset once", "is missing", "(an edited file)"]),
    (lambda f, b: (f, [*b, b[-1]]), ["line 43", "does not name each protein of the dataset once", "again"]),
    (lambda f, b: (f, [*b, "P999999\tP999999"]), ["names 'P999999', which the dataset lacks", "(an edited file)"]),
    (lambda f, b: (f, [*b[:-1], b[-1].replace("\t", " ")]), ["line 42", "is not 'cluster<TAB>unique_id'"]),
    (_split_off, ["its rows are not those the cluster stage wrote"]),
    (_record(lambda r: r.pop(HASH_KEY)), ["records no content hash", "older version of the cluster stage"]),
    (_record(lambda r: r.update(proteins=39)), ["records 39 proteins but its rows name 40"]),
])
def test_an_edited_clusters_file_is_refused_in_one_line(clustered, tmp_path, edit, parts):
    config, tsv = clustered["data"]["config"], clustered["data"]["tsv"]
    edited = _edit(tsv, tmp_path / "edited.tsv", edit)
    assert edited.read_text() != tsv.read_text()
    out = tmp_path / "out"
    error_line(split(config, edited, out), str(edited), *parts)
    assert not out.exists()


@needs_mmseqs
def test_the_clusters_file_of_another_dataset_is_refused(clustered, tmp_path):
    data, other = clustered["data"], clustered["other"]
    out = tmp_path / "out"
    error_line(split(data["config"], other["tsv"], out), str(other["tsv"]), "made with dataset.dataset_location",
               "rerun the cluster stage")
    # the other data's ids, written under this data's first line (settings and hash of another file)
    first = data["tsv"].read_text().splitlines()[0]
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("\n".join([first, *other["tsv"].read_text().splitlines()[1:]]) + "\n")
    error_line(split(data["config"], mixed, out), str(mixed), "does not name each protein of the dataset once",
               repr(data["ids"][0]), "is missing")
    assert not out.exists()


# ----------------------------------------------------------------------------- NaN/Inf checkpoints


def poisoned(source: Path, path: Path, value: float = float("nan"), part: str = "model") -> tuple[Path, str]:
    """A copy of checkpoint ``source`` with one entry of one weight (of ``part``) set to ``value``;
    returns the file and the weight's name."""
    state = torch.load(source, weights_only=True)
    name = next(k for k in state[part] if k.endswith("mixer.in_proj.weight"))
    state[part][name] = state[part][name].clone()
    state[part][name].view(-1)[3] = value
    torch.save(state, path)
    return path, name


def fasta(path: Path) -> Path:
    path.write_text("".join(f">{k}\n{v}\n" for k, v in SEQS.items()))
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_predict_refuses_a_checkpoint_with_nan_or_inf_weights(checkpoint: Path, tmp_path: Path, value):
    bad, name = poisoned(checkpoint, tmp_path / "poisoned.ckpt", value)
    out = tmp_path / "o.h5"
    line = error_line(run_cli("predict", "--checkpoint", bad, "--input", fasta(tmp_path / "in.fasta"),
                              "--output", out), f"error: {bad}: ", f"weight {name} holds NaN/Inf values")
    assert "tmp" not in line.replace(str(tmp_path), "")  # the checkpoint is named, no temporary file
    assert not out.exists()
    with pytest.raises(PipelineError, match=f"^{bad}: damaged checkpoint: weight {name} holds NaN/Inf values$"):
        load_model(bad)


def _train_config(embedded_project, tmp_path: Path, name: str, **training) -> Path:
    root, config = embedded_project
    cfg = dict(config, run_name=name)
    cfg["training"] = {**config["training"], "output_dir": str(tmp_path / "outputs"), "max_steps": 1,
                       "log_steps": 1, **training}
    return write_config(tmp_path / f"{name}.yaml", **cfg)


def train(embedded_project, config: Path):
    return run_cli("train", "--config", config, "--split_dir", embedded_project[0] / "split", "--no_progress")


def test_init_from_a_checkpoint_with_nan_weights_is_one_line(embedded_project, checkpoint: Path, tmp_path: Path):
    bad, name = poisoned(checkpoint, tmp_path / "poisoned.ckpt")
    config = _train_config(embedded_project, tmp_path, "nan-init", init_from=str(bad))
    error_line(train(embedded_project, config), f"error: training.init_from: {bad}: ",
               f"weight {name} holds NaN/Inf values")
    assert not (run_dir(tmp_path / "outputs", "nan-init") / BEST_CKPT).exists()


@pytest.mark.parametrize("part", ["model", "best_model"])
def test_resume_from_a_checkpoint_with_nan_weights_is_one_line(embedded_project, checkpoint: Path, tmp_path: Path,
                                                               part):
    last = checkpoint.parent / LAST_CKPT
    bad, name = poisoned(last, tmp_path / "poisoned-last.ckpt", part=part)
    config = _train_config(embedded_project, tmp_path, "nan-resume", resume_from_checkpoint=str(bad), max_steps=3)
    where = name if part == "model" else f"{name} (of 'best_model')"
    error_line(train(embedded_project, config), f"error: training.resume_from_checkpoint: {bad}: ",
               f"weight {where} holds NaN/Inf values")
    assert not (run_dir(tmp_path / "outputs", "nan-resume") / LAST_CKPT).exists()


def test_a_finite_checkpoint_still_loads(checkpoint: Path):
    assert load_model(checkpoint).settings is not None
