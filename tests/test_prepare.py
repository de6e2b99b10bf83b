"""ptm-mamba prepare: the dataset CSV from a UniProtKB TSV export or the original's per-site table,
on hand-made files in their exact text conventions; every skip counted; the prepare rule."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, error_line, run_cli, write_config
from ptm_mamba.config import validate
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import SPLIT_DIR, prepared_summary_path, split_paths
from ptm_mamba.prepare import check_prepared
from ptm_mamba.settings import Settings
from ptm_mamba.split import run_split

# Columns as UniProtKB's TSV download names them (an extra one, Entry Name, is ignored).
# Positions of P00001's sequence MASGKRRSSLPVNGTYCAIL: A2 S3 K5 S8 S9 N13 T15 C17.
UNIPROT_TSV = "\n".join("\t".join(row) for row in [
    ("Entry", "Entry Name", "Sequence", "Modified residue", "Glycosylation", "Lipidation"),
    ("P00001", "TEST1_HUMAN", "MASGKRRSSLPVNGTYCAIL",
     'MOD_RES 2; /note="N-acetylalanine"; /evidence="ECO:0000269|PubMed:12345"; '
     'MOD_RES 8; /note="Phosphoserine; by PKA"; /evidence="ECO:0007744|PubMed:18669648, ECO:0000269|PubMed:2"; '
     'MOD_RES 9; /note="Phosphoserine"; /evidence="ECO:0000250|UniProtKB:P12345"; '
     'MOD_RES 9; /note="O-(pantetheine 4\'-phosphoryl)serine"; /evidence="ECO:0000250"; '
     'MOD_RES ?; /note="Phosphoserine"; '
     'MOD_RES 5; /note="N6-acetyllysine; alternate"; /evidence="ECO:0000269|PubMed:3"; '
     'MOD_RES 3; /note="Phosphotyrosine"',
     'CARBOHYD 13; /note="N-linked (GlcNAc...) asparagine"; /evidence="ECO:0000255"; '
     'CARBOHYD 15; /note="O-linked (GalNAc...) threonine"; /evidence="ECO:0000269|PubMed:4"',
     'LIPID 17; /note="S-palmitoyl cysteine"; /evidence="ECO:0000250"'),
    ("P00002", "TEST2_HUMAN", "MGQNVSLLTK", 'MOD_RES 25; /note="Phosphoserine"',
     'CARBOHYD 4; /note="N-linked (GlcNAc...) (complex) asparagine"; /evidence="ECO:0000269|PubMed:19349973"',
     'LIPID 2; /note="N-myristoyl glycine"; /evidence="ECO:0000269|PubMed:7"'),
    ("P00003", "TEST3_HUMAN", "MKLV", "", "", ""),
    ("P00004", "TEST4_HUMAN", "MHKL", 'MOD_RES 2; /note="Phosphohistidine"; /evidence="ECO:0000269"', "", ""),
    ("P00002", "TEST2_MOUSE", "MGQNVSLLTK", "", "", 'LIPID 2; /note="N-myristoyl glycine"'),
    ("P00006", "TEST6_HUMAN", "MKJLS", 'MOD_RES 5; /note="Phosphoserine"', "", ""),
]) + "\n"
UNIPROT_CSV = (
    "unique_id,ptm_seq\n"
    "P00001,M<N-acetylalanine>SG<N6-acetyllysine>RR<Phosphoserine><Phosphoserine>LPV"
    "<N-linked (GlcNAc...) asparagine>G<O-linked (GalNAc...) threonine>Y<S-palmitoyl cysteine>AIL\n"
    "P00002,M<N-myristoyl glycine>QNVSLLTK\n"
)

# The original's ptm_labels.csv: pandas' unnamed index, AC_ID, 0-based pos, label, ori_seq, token.
SITES_CSV = """,AC_ID,pos,label,ori_seq,token
0,P00001,1,N-acetylalanine,MASGKRRSSL,<N-acetylalanine>
1,P00001,7,Phosphoserine,MASGKRRSSL,<Phosphoserine>
2,P00001,4,N6-acetyllysine,MASGKRRSSL,<N6-acetyllysine>
3,P00002,1,N-myristoyl glycine,MGQNVSLLTK,<N-myristoyl glycine>
4,P00002,3,N-linked (GlcNAc...) asparagine,MGQNVSLLTK,<N-linked (GlcNAc...) asparagine>
5,P00002,40,Phosphoserine,MGQNVSLLTK,<Phosphoserine>
6,P00009,1,N-myristoyl glycine,MGQNVSLLTK,<N-myristoyl glycine>
7,P00003,0,Phosphoserine,MKKL,<Phosphoserine>
8,P00005,x,Phosphoserine,MSKL,<Phosphoserine>
"""
SITES_OUT = ("unique_id,ptm_seq\n"
             "P00001,M<N-acetylalanine>SG<N6-acetyllysine>RR<Phosphoserine>SL\n"
             "P00002,M<N-myristoyl glycine>Q<N-linked (GlcNAc...) asparagine>VSLLTK\n")


def prepare(fmt: str, source: Path, out: Path, own_process: bool = False) -> subprocess.CompletedProcess:
    return run_cli("prepare", "--format", fmt, "--input", source, "--output", out, own_process=own_process)


def test_uniprot_tsv_features_become_tokens_and_skips_are_counted(tmp_path):
    (tmp_path / "up.tsv").write_text(UNIPROT_TSV)
    # the real command, as its own process, once
    result = prepare("uniprot_tsv", tmp_path / "up.tsv", tmp_path / "out" / "data.csv", own_process=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "data.csv").read_text() == UNIPROT_CSV
    summary = json.loads(prepared_summary_path(tmp_path / "out" / "data.csv").read_text())
    assert (summary["entries_read"], summary["features_read"]) == (6, 16)
    assert (summary["proteins_written"], summary["ptm_sites_written"]) == (2, 8)
    assert summary["features_skipped"] == {
        "residue already has a PTM": 1, "uncertain or unreadable position": 1, "not the PTM's residue": 1,
        "position outside the sequence": 1, "not in the vocabulary": 2, "id seen before": 1,
        "empty sequence or not residues": 1}
    assert summary["entries_skipped"] == {"no PTM left": 2, "id seen before": 1, "empty sequence or not residues": 1}
    assert summary["not_in_vocabulary"] == {"<N-linked (GlcNAc...) (complex) asparagine>": 1, "<Phosphohistidine>": 1}
    assert summary["sites_per_token"]["<Phosphoserine>"] == 2
    assert summary["settings"]["dataset.source"]["format"] == "uniprot_tsv"
    assert "skipped feature (not in the vocabulary): 2" in result.stdout
    assert "skipped entry (no PTM left): 2" in result.stdout

    # the same export, gzipped as UniProt serves it, gives the same CSV
    with gzip.open(tmp_path / "up.tsv.gz", "wt") as fh:
        fh.write(UNIPROT_TSV)
    assert prepare("uniprot_tsv", tmp_path / "up.tsv.gz", tmp_path / "gz.csv").returncode == 0
    assert (tmp_path / "gz.csv").read_text() == UNIPROT_CSV


def test_ptm_mamba_site_table_is_grouped_by_sequence_with_0_based_positions(tmp_path):
    (tmp_path / "ptm_labels.csv").write_text(SITES_CSV)
    result = prepare("ptm_mamba_sites", tmp_path / "ptm_labels.csv", tmp_path / "data.csv")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data.csv").read_text() == SITES_OUT
    summary = json.loads(prepared_summary_path(tmp_path / "data.csv").read_text())
    assert (summary["entries_read"], summary["features_read"], summary["ptm_sites_written"]) == (4, 9, 5)
    assert summary["features_skipped"] == {"position outside the sequence": 1, "residue already has a PTM": 1,
                                           "not the PTM's residue": 1, "uncertain or unreadable position": 1}
    assert summary["entries_skipped"] == {"no PTM left": 2}

    # without AC_ID (and with bare names as tokens) the id derives from the PTM sequence
    bare = "ori_seq,pos,token\nMASK,2,Phosphoserine\n"
    (tmp_path / "bare.csv").write_text(bare)
    assert prepare("ptm_mamba_sites", tmp_path / "bare.csv", tmp_path / "bare_out.csv").returncode == 0
    uid, seq = (tmp_path / "bare_out.csv").read_text().splitlines()[1].split(",")
    assert uid.startswith("seq-") and seq == "MA<Phosphoserine>K"


@pytest.mark.parametrize("case", ["missing_column", "nothing_kept", "not_ours", "no_file"])
def test_mistakes_are_one_line_and_write_nothing(tmp_path, case):
    source, out = tmp_path / "src.tsv", tmp_path / "out" / "data.csv"
    fmt, text, needles = {
        "missing_column": ("uniprot_tsv", "Entry\tSequence\tModified residue\nP1\tMK\t\n",
                           ["src.tsv", "no column 'Glycosylation'", "Entry, Sequence, Modified residue"]),
        "nothing_kept": ("ptm_mamba_sites", "ori_seq,pos,token\nMK,0,<Phosphoserine>\n",
                         ["no entry with a PTM of the vocabulary", "1 entries"]),
        "not_ours": ("uniprot_tsv", UNIPROT_TSV, ["data.csv exists and was not made by the prepare stage"]),
        "no_file": ("uniprot_tsv", None, ["source file not found", "src.tsv"]),
    }[case]
    if text is not None:
        source.write_text(text)
    if case == "not_ours":
        out.parent.mkdir()
        out.write_text("unique_id,ptm_seq\nP1,MK\n")
    error_line(prepare(fmt, source, out), *needles)
    assert sorted(p.name for p in out.parent.glob("*")) == (["data.csv"] if case == "not_ours" else [])


def test_the_split_refuses_a_csv_not_prepared_from_the_configured_source(tmp_path):
    (tmp_path / "up.tsv").write_text(UNIPROT_TSV)
    (tmp_path / "other.tsv").write_text(UNIPROT_TSV.replace("MOD_RES 8;", "MOD_RES 9;"))
    csv_path = tmp_path / "data.csv"
    assert prepare("uniprot_tsv", tmp_path / "up.tsv", csv_path).returncode == 0

    def settings(source: str) -> Settings:
        return Settings.from_config(validate({"dataset": {
            "dataset_location": str(csv_path), "val_size": 1, "test_size": 1,
            "source": {"format": "uniprot_tsv", "path": str(tmp_path / source)}}}))

    check_prepared(settings("up.tsv"))  # the CSV of this source: accepted
    summary = re.escape(prepared_summary_path(csv_path).name)
    with pytest.raises(PipelineError, match=rf"{summary}: made with dataset.source = .*rerun the prepare"):
        run_split(settings("other.tsv"), tmp_path / "split")
    csv_path.write_text(csv_path.read_text() + "P9,MK<Phosphoserine>\n")
    with pytest.raises(PipelineError, match=rf"data\.csv is not the file {summary} records"):
        run_split(settings("up.tsv"), tmp_path / "split")


def snakemake(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
                           str(split_paths(SPLIT_DIR)["summary"]), *args, "--directory", str(root),
                           "--configfile", str(root / "config.yaml")], capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_prepare_rule_builds_the_dataset_from_a_source(tmp_path):
    rows = UNIPROT_TSV.splitlines()
    body = [rows[1].replace("P00001", f"Q{i:05d}").replace("CAIL", f"CAI{aa}")  # 12 more proteins to split
            for i, aa in enumerate("ACDEFGHIKLMN")]
    (tmp_path / "up.tsv").write_text("\n".join([rows[0], *body, *rows[2:]]) + "\n")
    write_config(tmp_path / "config.yaml", dataset={
        "source": {"format": "uniprot_tsv", "path": "up.tsv"}, "dataset_location": "data/prepared.csv",
        "val_size": 2, "test_size": 2})
    result = snakemake(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert prepared_summary_path(tmp_path / "data" / "prepared.csv").is_file()
    split = json.loads(split_paths(tmp_path / SPLIT_DIR)["summary"].read_text())
    assert sum(s["sequences"] for s in split["splits"].values()) == 13
    assert "dataset.source" in split["settings"] and "dataset.dataset_location" not in split["settings"]
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(tmp_path, "-n"))

    # a dataset_location that the prepare stage did not write is never its output
    write_config(tmp_path / "config.yaml", dataset={
        "source": {"format": "uniprot_tsv", "path": "up.tsv"}, "dataset_location": str(REPO / "datasets" / "demo.csv")})
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0 and "demo.csv exists and was not made by the prepare stage" in result.stderr
