"""provenance.json of a run: data, ESM-2 weights, code, packages, machine; and its report table."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import pytest

from conftest import toy_rows, write_csv
from ptm_mamba import provenance, report
from ptm_mamba.config import validate
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import PROVENANCE_FILE, report_files, run_dir
from ptm_mamba.settings import Settings
from ptm_mamba.testing import write_tiny_esm2_checkpoint


@pytest.fixture
def config(tmp_path) -> dict:
    data = write_csv(tmp_path / "data.csv", toy_rows(7))
    esm = write_tiny_esm2_checkpoint(tmp_path / "esm2_t2_tiny.pt", num_layers=2, embed_dim=16, attention_heads=2)
    return validate({"dataset": {"dataset_location": str(data)}, "esm": {"model": str(esm)}})


def test_provenance_records_data_weights_code_packages_and_machine(config, tmp_path):
    record = provenance.provenance(Settings.from_config(config))
    data = (tmp_path / "data.csv").read_bytes()
    assert record["dataset"]["sha256"] == f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert record["dataset"]["rows"] == 7
    esm = (tmp_path / "esm2_t2_tiny.pt").read_bytes()
    assert record["esm"]["identity"] == f"sha256:{hashlib.sha256(esm).hexdigest()}"
    assert set(record["packages"]) == {"ptm-mamba", "torch", "mamba-ssm", "fair-esm", "snakemake", "accelerate"}
    assert record["packages"]["torch"] and record["packages"]["fair-esm"] == "2.0.0"
    assert isinstance(record["gpus"], list) and record["host"] and record["processes"] >= 1
    if shutil.which("git"):  # this checkout is a git repository
        assert len(record["code"]["commit"]) == 40 and isinstance(record["code"]["dirty"], bool)
    json.dumps(record)  # JSON-plain

    # a pretrained name is its own identity (fair-esm's published weights are fixed per name)
    named = validate({"dataset": config["dataset"], "esm": {"model": "esm2_t6_8M_UR50D"}})
    assert provenance.provenance(Settings.from_config(named))["esm"]["identity"] == "esm2_t6_8M_UR50D"


def test_no_git_and_no_package_are_null_not_failures(tmp_path, monkeypatch):
    assert provenance.git_commit(tmp_path) is None  # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary at all
    assert provenance.git_commit() is None
    assert provenance.package_versions(("surely-not-installed-pkg",)) == {"surely-not-installed-pkg": None}


def test_write_provenance_beside_the_run_config_and_the_report_table(config, tmp_path):
    run = run_dir(tmp_path / "outputs", "x")
    path = provenance.write_provenance(Settings.from_config(config), run)
    assert path == run / PROVENANCE_FILE and not list(run.glob(".*tmp*"))
    record = json.loads(path.read_text())
    with open(report.provenance_table(path, report_files(tmp_path)["provenance"]), newline="") as fh:
        rows = dict(csv.reader(fh, delimiter="\t"))
    assert rows.pop("item") == "value"
    assert rows["dataset.sha256"] == record["dataset"]["sha256"] and rows["dataset.rows"] == "7"
    assert rows["esm.identity"] == record["esm"]["identity"]
    assert rows["packages.torch"] == record["packages"]["torch"]
    assert rows["dataset.source"] == ""  # null

    # a run made before provenance was recorded: one row saying so; a broken file: one line
    missing = report.provenance_table(tmp_path / "nothing" / PROVENANCE_FILE, tmp_path / "p2.tsv")
    assert missing.read_text() == f"item\tvalue\nprovenance\tnot recorded ({PROVENANCE_FILE} not found)\n"
    (tmp_path / "broken.json").write_text("[1, 2]")
    with pytest.raises(PipelineError, match="broken.json: expected a JSON object"):
        report.provenance_table(tmp_path / "broken.json", tmp_path / "p3.tsv")
