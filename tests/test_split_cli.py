"""The split stage through the real CLI: good data splits, bad data fails with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import error_line, run_cli, toy_rows, write_config, write_csv
from ptm_mamba.layout import split_csv, split_paths


def split(config: Path, out: Path, own_process: bool = False):
    return run_cli("split", "--config", config, "--output_dir", out, own_process=own_process)


def test_split_writes_files_and_is_deterministic(toy_config: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert split(toy_config, a, own_process=True).returncode == 0  # the real command, once
    assert split(toy_config, b).returncode == 0
    for key, path in split_paths(a).items():
        assert path.read_bytes() == split_paths(b)[key].read_bytes(), key
    mapping = json.loads(split_paths(a)["mapping"].read_text())
    assert len(mapping) == 20
    assert sorted(mapping.values()).count("val") == 3
    assert sorted(mapping.values()).count("test") == 3
    summary = json.loads(split_paths(a)["summary"].read_text())["splits"]
    assert summary["train"]["sequences"] == 14
    assert summary["train"]["ptm_sites"] == 14 * 2
    # ids in different splits never overlap, and every split file holds its ids
    seen = set()
    for name in ("train", "val", "test"):
        ids = [line.split(",")[0] for line in split_csv(a, name).read_text().splitlines()[1:]]
        assert not seen & set(ids)
        seen |= set(ids)
        assert all(mapping[i] == name for i in ids)
    assert len(seen) == 20


def test_split_ignores_row_order_and_depends_on_seed(tmp_path: Path):
    rows = toy_rows()
    c1 = write_config(tmp_path / "c1.yaml", dataset={
        "dataset_location": str(write_csv(tmp_path / "d1.csv", rows)), "val_size": 3, "test_size": 3})
    c2 = write_config(tmp_path / "c2.yaml", dataset={
        "dataset_location": str(write_csv(tmp_path / "d2.csv", rows[::-1])), "val_size": 3, "test_size": 3})
    c3 = write_config(tmp_path / "c3.yaml", dataset={
        "dataset_location": str(tmp_path / "d1.csv"), "val_size": 3, "test_size": 3, "split_seed": 7})
    for c, out in ((c1, "o1"), (c2, "o2"), (c3, "o3")):
        assert split(c, tmp_path / out).returncode == 0
    m = [json.loads(split_paths(tmp_path / o)["mapping"].read_text()) for o in ("o1", "o2", "o3")]
    assert m[0] == m[1]
    assert m[0] != m[2]


def test_fractions_and_derived_ids(tmp_path: Path):
    rows = toy_rows()
    data = tmp_path / "d.csv"
    data.write_text("ptm_seq\n" + "\n".join(seq for _, seq in rows + rows[:2]) + "\n")  # 2 duplicates
    config = write_config(tmp_path / "c.yaml", dataset={
        "dataset_location": str(data), "id_column_name": None, "val_size": 0.1, "test_size": 0.1})
    assert split(config, tmp_path / "out").returncode == 0
    mapping = json.loads(split_paths(tmp_path / "out")["mapping"].read_text())
    assert len(mapping) == 20  # exact duplicate sequences kept once
    assert all(k.startswith("seq-") for k in mapping)
    assert list(mapping.values()).count("val") == 2


def test_long_sequences_are_kept(tmp_path: Path):
    rows = toy_rows() + [("LONG", "M" + "A" * 300)]
    config = write_config(tmp_path / "c.yaml", dataset={
        "dataset_location": str(write_csv(tmp_path / "d.csv", rows)), "val_size": 2, "test_size": 2,
        "max_sequence_length": 100})
    assert split(config, tmp_path / "out").returncode == 0
    summary = json.loads(split_paths(tmp_path / "out")["summary"].read_text())["splits"]
    assert max(s["max_length"] for s in summary.values()) == 301
    assert sum(s["sequences"] for s in summary.values()) == 21


BAD_CASES = {
    # name: (csv text or None for a missing file, config overrides, expected message parts)
    "missing_file": (None, {}, ["dataset file not found", "data.csv"]),
    "empty_file": ("", {}, ["data.csv", "empty"]),
    "missing_sequence_column": ("unique_id,seq\nP1,MK\n", {},
                                ["no column 'ptm_seq'", "sequence_column_name", "'unique_id', 'seq'"]),
    "missing_id_column": ("id,ptm_seq\nP1,MK\n", {}, ["no column 'unique_id'", "id_column_name", "'id', 'ptm_seq'"]),
    "empty_sequence": ("unique_id,ptm_seq\nP1,MKV\nP2,\n", {}, ["line 3", "empty sequence"]),
    "nan_sequence": ("unique_id,ptm_seq\nP1,MKV\nP2,NaN\n", {}, ["line 3", "empty sequence"]),
    "bad_residue": ("unique_id,ptm_seq\nP1,MKV\nP2,MKJL\n", {}, ["line 3", "P2", "'J'", "not a residue", "position 3"]),
    "unknown_ptm": ("unique_id,ptm_seq\nP1,MK<Foo>V\nP2,M<Foo>K<Bar>\n", {},
                    ["unknown PTM", "<Foo> x2", "<Bar> x1", "line 2", "unknown_ptm: unk"]),
    "duplicate_ids": ("unique_id,ptm_seq\nP1,MKV\nP2,MKL\nP1,MKA\n", {}, ["line 4", "duplicate id 'P1'", "line 2"]),
    "no_training_data": ("unique_id,ptm_seq\nP1,MKV\nP2,MKL\nP3,MKA\n", {"val_size": 2, "test_size": 1},
                         ["val_size (2)", "test_size (1)", "no training", "3 sequences"]),
    "not_utf8": (b"unique_id,ptm_seq\nP1,MKV\nP2,MK\xff\n", {}, ["data.csv", "line 3", "not UTF-8", "0xff"]),
    "bad_config_value": ("unique_id,ptm_seq\nP1,MKV\n", {"val_size": "ten"}, ["dataset.val_size", "'ten'"]),
    "unknown_config_key": ("unique_id,ptm_seq\nP1,MKV\n", {"vall_size": 3}, ["unknown key 'vall_size'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_with_one_line(case: str, tmp_path: Path):
    text, overrides, parts = BAD_CASES[case]
    data = tmp_path / "data.csv"
    if isinstance(text, bytes):
        data.write_bytes(text)
    elif text is not None:
        data.write_text(text)
    config = write_config(tmp_path / "config.yaml",
                          dataset={"dataset_location": str(data), "val_size": 1, "test_size": 1, **overrides})
    out = tmp_path / "out"
    error_line(split(config, out), *parts)
    assert not out.exists() or not any(out.iterdir())


def test_unknown_ptm_policy_unk_maps_to_unk(tmp_path: Path):
    rows = toy_rows() + [("X1", "MK<Foo>V")]
    config = write_config(tmp_path / "c.yaml", dataset={
        "dataset_location": str(write_csv(tmp_path / "d.csv", rows)), "val_size": 2, "test_size": 2,
        "unknown_ptm": "unk"})
    assert split(config, tmp_path / "out").returncode == 0
    from ptm_mamba.split import read_split

    proteins = {p.id: p for name in ("train", "val", "test")
                for p in read_split(tmp_path / "out" / f"{name}.csv", unknown_ptm="unk")}
    assert proteins["X1"].tokens == ("M", "K", "<unk>", "V")
