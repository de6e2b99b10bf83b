"""The report: figures and tables of a run (ptm_mamba/report.py), and the Snakemake HTML report end to end."""

from __future__ import annotations

import argparse
import csv
import json
import math
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from ptm_mamba import report  # module import: its test_results_table must not be collected as a test
from ptm_mamba.errors import PipelineError
from ptm_mamba.layout import CONFIG_FILE, METRICS_FILE, PROVENANCE_FILE, report_files, split_paths, split_store_path
from ptm_mamba.train import without_throughput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BY_TYPE = {"<Phosphoserine>": {"sites": 40, "acc": 0.25}, "<N6-acetyllysine>": {"sites": 7, "acc": 0.5},
           "<Sulfotyrosine>": {"sites": 1, "acc": 1.0}}


def synthetic_metrics(steps: int = 300, steps_per_epoch: int = 100, val_every: int = 50,
                      with_test: bool = True, by_type: dict | None = None, gpu: bool = True) -> list[dict]:
    """Records shaped like train.py's: header, train steps, per-batch + average val, then test."""
    rng = np.random.default_rng(0)
    records: list[dict] = [{"split_sizes": {"train": 800, "val": 100, "test": 100}, "num_parameters": 123456}]
    for step in range(1, steps + 1):
        loss = 4.0 * math.exp(-step / 150) + 1.0 + 0.1 * rng.standard_normal()
        records.append({"Epoch": (step - 1) // steps_per_epoch, "Step": step, "train_loss": loss,
                        "train_acc": 1 - loss / 5, "train_ptm_acc": 0.5 - loss / 10,
                        "train_perplexity": math.exp(loss), "lr": 1e-3 * min(1.0, step / 20), "tokens": 4000,
                        "tokens_per_s": 9000 + 500 * rng.standard_normal(), "loader_wait_fraction": rng.uniform(0, 0.3),
                        "peak_memory_gib": 2.5 + step / steps if gpu else None})
        if step % val_every == 0:
            val = 4.0 * math.exp(-step / 150) + 1.1
            for batch in range(2):
                records.append({"Epoch": (step - 1) // steps_per_epoch, "Step": step, "batch": batch,
                                "val_loss": val, "val_acc": 0.5, "val_ptm_acc": 0.2, "val_perplexity": 3.0})
            records.append({"Epoch": (step - 1) // steps_per_epoch, "Step": step, "avg_val_loss": val,
                            "avg_val_acc": 1 - val / 5, "avg_val_ptm_acc": 0.5 - val / 10,
                            "avg_val_perplexity": math.exp(val)})
    if with_test:
        records.append({"Epoch": 2, "Step": steps, "batch": 0, "test_loss": 1.2, "test_acc": 0.7,
                        "test_ptm_acc": 0.3, "test_perplexity": 3.3})
        records.append({"Epoch": 2, "Step": steps, "avg_test_loss": 1.2, "avg_test_acc": 0.7,
                        "avg_test_ptm_acc": 0.3, "avg_test_perplexity": 3.32,
                        "test_ptm_acc_by_type": BY_TYPE if by_type is None else by_type})
    return records


def write_metrics(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def png_shape(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking that it decodes completely."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    pixels = matplotlib.image.imread(path)  # raises on a truncated or corrupt file
    assert pixels.shape[:2] == (height, width)
    return width, height


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# ----------------------------------------------------------------------------- reading metrics.json

def test_load_metrics_sorts_kinds_and_keeps_the_last_record_per_step(tmp_path):
    records = synthetic_metrics(steps=10, val_every=5)
    records.insert(1, {"Epoch": 0, "Step": 2, "train_loss": 9.0, "lr": 0.1})  # replaced by the later step 2
    records[2], records[3] = records[3], records[2]  # steps 2 and 1 out of order
    records.append({"Epoch": 0, "Step": 5, "avg_val_loss": 0.5, "avg_val_acc": 0.9})  # replaces step 5's
    m = report.load_metrics(write_metrics(tmp_path / "m.json", records))
    assert [r["Step"] for r in m.train] == list(range(1, 11))
    assert m.train[1]["train_loss"] != 9.0
    assert [r["Step"] for r in m.val] == [5, 10]
    assert m.header["num_parameters"] == 123456
    assert m.test["avg_test_loss"] == 1.2
    steps, losses = m.series("val", "avg_val_loss")
    assert steps.tolist() == [5, 10] and losses[0] == 0.5
    assert m.best_val()["Step"] == 5
    steps, ptm = m.series("val", "avg_val_ptm_acc")  # the replacing record has none
    assert steps.tolist() == [10]


def test_load_metrics_refuses_a_broken_file_with_its_name(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(PipelineError, match="metrics.json.*list"):
        report.load_metrics(bad)
    bad.write_text("[1, 2")
    with pytest.raises(PipelineError, match="not valid JSON"):
        report.load_metrics(bad)
    with pytest.raises(PipelineError, match="not found"):
        report.load_metrics(tmp_path / "missing.json")


def test_moving_average_is_the_trailing_mean():
    values = np.array([1.0, 2.0, 6.0, 3.0, 8.0])
    expected = [np.mean(values[max(0, i - 2):i + 1]) for i in range(values.size)]
    np.testing.assert_allclose(report.moving_average(values, 3), expected)
    np.testing.assert_array_equal(report.moving_average(values, 1), values)
    assert report.smoothing_window(10) == 1 and report.smoothing_window(10_000) == 400


# ----------------------------------------------------------------------------- figures

def test_plot_metrics_writes_readable_pngs(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.json", synthetic_metrics())
    paths = report.plot_metrics(metrics, tmp_path / "out")
    assert set(paths) == set(report.FIGURES)
    for name, path in paths.items():
        assert path == report_files(tmp_path / "out")[name] and path.is_file()
        width, height = png_shape(path)
        assert width == round(report.FIGSIZE[0] * report.DPI), name
        assert 300 <= height <= 2000, name
        assert path.stat().st_size > 15_000, f"{name} looks empty"
    assert not list((tmp_path / "out").glob(".*tmp*")), "temp files left behind"


def test_the_throughput_figure_shows_what_was_recorded(tmp_path):
    """tokens/s, loader wait and GPU memory per step; a CPU run (memory null) and a run of an earlier
    version (no throughput fields) still get the figure, with a note in place of the missing curves."""
    gpu = report.plot_metrics(write_metrics(tmp_path / "gpu.json", synthetic_metrics()), tmp_path / "gpu")
    cpu = report.plot_metrics(write_metrics(tmp_path / "cpu.json", synthetic_metrics(gpu=False)), tmp_path / "cpu")
    old = without_throughput(synthetic_metrics())
    earlier = report.plot_metrics(write_metrics(tmp_path / "old.json", old), tmp_path / "old")
    m = report.load_metrics(tmp_path / "cpu.json")
    assert m.series("train", "loader_wait_fraction")[0].size == 300
    assert m.series("train", "peak_memory_gib")[0].size == 0  # null on the CPU
    sizes = [run["throughput"].stat().st_size for run in (gpu, cpu, earlier)]
    assert sizes[0] > sizes[1] > sizes[2], sizes  # three curves, two and a note, notes only
    for run in (gpu, cpu, earlier):
        png_shape(run["throughput"])


def test_the_figures_show_the_test_results_when_there_are_some(tmp_path):
    full = report.plot_metrics(write_metrics(tmp_path / "a.json", synthetic_metrics()), tmp_path / "a")
    partial = report.plot_metrics(write_metrics(tmp_path / "b.json", synthetic_metrics(with_test=False)),
                                  tmp_path / "b")
    assert full["loss"].read_bytes() != partial["loss"].read_bytes()  # the test-loss line
    assert full["learning_rate"].read_bytes() == partial["learning_rate"].read_bytes()  # same lr data
    # Without test results the bar chart is a short note, far smaller than a chart of three bars.
    assert partial["test_ptm_accuracy"].stat().st_size < full["test_ptm_accuracy"].stat().st_size


@pytest.mark.parametrize("records", [
    pytest.param(synthetic_metrics(with_test=False), id="no-test-records"),
    pytest.param(synthetic_metrics(steps=5, val_every=100, with_test=False), id="no-validation-yet"),
    pytest.param(synthetic_metrics()[:1], id="header-only"),
    pytest.param(synthetic_metrics(by_type={}), id="zero-ptm-sites"),
    pytest.param([], id="empty-list"),
])
def test_plot_metrics_writes_every_figure_for_partial_runs(tmp_path, records):
    paths = report.plot_metrics(write_metrics(tmp_path / "metrics.json", records), tmp_path / "out")
    assert set(paths) == set(report.FIGURES)
    for path in paths.values():
        png_shape(path)


def test_the_ptm_bar_chart_is_capped_and_grows_with_the_number_of_types(tmp_path):
    many = {f"<PTM {i}>": {"sites": 100 - i, "acc": i / 60} for i in range(60)}
    few = report.plot_metrics(write_metrics(tmp_path / "a.json", synthetic_metrics()), tmp_path / "a")
    lots = report.plot_metrics(write_metrics(tmp_path / "b.json", synthetic_metrics(by_type=many)), tmp_path / "b")
    _, h_few = png_shape(few["test_ptm_accuracy"])
    _, h_many = png_shape(lots["test_ptm_accuracy"])
    assert h_many > 2 * h_few
    assert h_many <= round((0.32 * report.MAX_PTM_BARS + 1.6) * report.DPI) + 1


# ----------------------------------------------------------------------------- tables

def test_test_results_table_holds_overall_metrics_and_every_ptm_type(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.json", synthetic_metrics())
    rows = read_tsv(report.test_results_table(metrics, tmp_path / "test_results.tsv"))
    overall = {r["metric"]: r for r in rows if r["scope"] == "all"}
    assert float(overall["loss"]["value"]) == 1.2
    assert float(overall["perplexity"]["value"]) == 3.32
    assert float(overall["accuracy"]["value"]) == 0.7
    assert float(overall["PTM accuracy"]["value"]) == 0.3
    assert int(overall["PTM accuracy"]["sites"]) == sum(v["sites"] for v in BY_TYPE.values())
    best_step = int(overall["best.ckpt step (lowest validation loss)"]["value"])
    assert best_step == 300  # the synthetic validation loss falls all the way
    per_type = [r for r in rows if r["scope"] != "all"]
    assert [r["scope"] for r in per_type] == ["Phosphoserine", "N6-acetyllysine", "Sulfotyrosine"]
    assert [(int(r["sites"]), float(r["value"])) for r in per_type] == [(40, 0.25), (7, 0.5), (1, 1.0)]


def test_test_results_table_is_only_a_header_without_test_results(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.json", synthetic_metrics(with_test=False))
    out = report.test_results_table(metrics, tmp_path / "test_results.tsv")
    assert out.read_text() == "scope\tmetric\tsites\tvalue\n"


def test_split_table_of_a_real_split(tmp_path, toy_config):
    from ptm_mamba.config import load_config
    from ptm_mamba.settings import Settings
    from ptm_mamba.split import run_split

    summary = run_split(Settings.from_config(load_config(toy_config)), tmp_path / "split")["splits"]
    rows = read_tsv(report.split_table(split_paths(tmp_path / "split")["summary"], report_files(tmp_path)["splits"]))
    assert [r["split"] for r in rows] == ["train", "val", "test", "total"]
    for r in rows[:3]:
        s = summary[r["split"]]
        assert int(r["sequences"]) == s["sequences"] and int(r["ptm_sites"]) == s["ptm_sites"]
        assert r["fingerprint"] == s["fingerprint"]
        assert float(r["ptm_sites_per_100_residues"]) == pytest.approx(100 * s["ptm_sites"] / s["residues"],
                                                                       rel=1e-5)
    total = rows[3]
    for col in ("sequences", "residues", "ptm_sites"):
        assert int(total[col]) == sum(s[col] for s in summary.values())
    assert int(total["max_length"]) == max(s["max_length"] for s in summary.values())


def test_split_table_names_a_missing_key(tmp_path):
    bad = tmp_path / "summary.json"
    bad.write_text(json.dumps({"splits": {"train": {"sequences": 3}}}))
    with pytest.raises(PipelineError, match="summary.json.*'train' lacks residues"):
        report.split_table(bad, tmp_path / "splits.tsv")


def write_store(path: Path, lengths: list[int], dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A shard file of random proteins; returns replicate 0's features (as float16) and mask."""
    from ptm_mamba.embedding_store import ShardWriter

    rng = np.random.default_rng(seed)
    feats, masks = [], []
    attrs = {"esm_model": "esm2_t2_tiny", "repr_layer": 2, "split": "val", "split_fingerprint": "x",
             "mask_prob": 0.15, "mask_seed": 0}
    with ShardWriter(path, dim=dim, replicates=2, attrs=attrs) as w:
        for i, n in enumerate(lengths):  # rows <cls>, n residues, <eos>, as the embed stage stores them
            f = [rng.normal(0.5, 2.0, (n + 2, dim)).astype(np.float16) for _ in range(2)]
            for x in f:
                x[[0, -1]] = 60.0  # far from the residues' values: the statistics are the residues'
            m = [np.concatenate([[False], rng.random(n) < 0.15, [False]]) for _ in range(2)]
            w.add(f"P{i}", f, m)
            feats.append(f[0][1:-1])
            masks.append(m[0][1:-1])
    return np.concatenate(feats).astype(np.float64), np.concatenate(masks)


def test_embedding_stats_reads_sizes_and_value_statistics(tmp_path):
    feats, mask = write_store(tmp_path / "val.h5", [30, 12, 50])
    rows = read_tsv(report.embedding_stats([tmp_path / "val.h5"], tmp_path / "embeddings.tsv"))
    assert len(rows) == 1
    r = rows[0]
    assert (r["split"], int(r["proteins"]), int(r["residues"]), int(r["dim"]), int(r["replicates"])) == \
        ("val", 3, 92, 8, 2)
    assert (r["esm_model"], r["repr_layer"]) == ("esm2_t2_tiny", "2")
    assert int(r["sampled_residues"]) == 92  # small enough to read whole
    assert float(r["mean"]) == pytest.approx(feats.mean(), rel=1e-5)
    assert float(r["std"]) == pytest.approx(feats.std(), rel=1e-5)
    assert float(r["masked_fraction"]) == pytest.approx(mask.mean(), rel=1e-5)


def test_embedding_stats_reads_a_bounded_sample(tmp_path):
    feats, _ = write_store(tmp_path / "big.h5", [400] * 10)
    rows = read_tsv(report.embedding_stats([tmp_path / "big.h5"], tmp_path / "e.tsv", max_values=8 * 320))
    sampled = int(rows[0]["sampled_residues"])
    assert 0 < sampled <= 320 and int(rows[0]["residues"]) == 4000
    assert float(rows[0]["mean"]) == pytest.approx(feats.mean(), abs=0.3)  # a sample, spread over the file


def test_embedding_stats_without_files_is_a_header(tmp_path):
    out = report.embedding_stats([], tmp_path / "e.tsv")
    assert out.read_text().splitlines() == ["\t".join(report.EMBEDDING_COLUMNS)]


def test_embedding_stats_refuses_a_broken_file(tmp_path):
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(PipelineError, match="bad.h5"):
        report.embedding_stats([tmp_path / "bad.h5"], tmp_path / "e.tsv")


# ----------------------------------------------------------------------------- the run at a glance, HTML pages

class PageParser(HTMLParser):
    """The parts of an HTML page the tests read: table rows as cell texts (``section``/``total``
    classes kept), the text of <pre>, tags used, and every attribute that could fetch something."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.row_classes: list[str | None] = []
        self.pre, self.tags, self.links = "", [], []
        self._cell: list[str] | None = None
        self._in_pre = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        self.links += [f"{tag} {k}={v}" for k, v in attrs.items() if k in ("src", "href", "action")]
        if tag == "tr":
            self.rows.append([])
            self.row_classes.append(attrs.get("class"))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._in_pre = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_pre:
            self.pre += data


def parse_page(path: Path) -> PageParser:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>"), path
    page = PageParser(text)
    assert "script" not in page.tags and not page.links, f"{path} is not self-contained: {page.links}"
    return page


def write_run_files(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    """metrics.json, the split stage's summary.json, config.yaml and provenance.json of a run."""
    import yaml

    files = {"metrics": write_metrics(tmp_path / METRICS_FILE, records),
             "summary": split_paths(tmp_path)["summary"], "config": tmp_path / CONFIG_FILE,
             "provenance": tmp_path / PROVENANCE_FILE}
    files["summary"].write_text(json.dumps({"splits": {
        "train": {"sequences": 800, "residues": 90000, "ptm_sites": 2500, "max_length": 1000},
        "val": {"sequences": 100, "residues": 11000, "ptm_sites": 300, "max_length": 900},
        "test": {"sequences": 100, "residues": 12000, "ptm_sites": 310, "max_length": 950}}}))
    files["config"].write_text(yaml.safe_dump({
        "run_name": "demo", "dataset": {"dataset_location": "datasets/ptm.csv", "split_by": "cluster",
                                        "cluster_identity": 0.3},
        "esm": {"model": "esm2_t33_650M_UR50D"}, "model": {"model_type": "bidirectional_mamba", "d_model": 768,
                                                           "n_layer": 24},
        "training": {"max_steps": 300, "use_esm": True}}, sort_keys=False))
    files["provenance"].write_text(json.dumps({
        "created": "2026-01-02T03:04:05+00:00", "dataset": {"path": "datasets/ptm.csv", "rows": 1000},
        "host": "node7", "gpus": ["NVIDIA H200"] * 4, "processes": 4, "runtime": {"device": "cuda"},
        "code": {"commit": "abc", "dirty": False}, "packages": {"torch": "2.13.0", "mamba-ssm": None},
        "settings": {"train": {"training.lr": 0.001}, "split": {"dataset.split_seed": 42}}}))
    return files


def test_run_summary_says_what_the_run_was_and_how_it_did(tmp_path):
    files = write_run_files(tmp_path, synthetic_metrics())
    rows = report.run_summary(files["metrics"], files["summary"], files["config"], files["provenance"])
    assert dict(rows) == {
        "run": "demo",
        "trained": "2026-01-02 03:04 UTC on node7 (4 × NVIDIA H200, 4 processes)",
        "dataset": "datasets/ptm.csv (1,000 rows), split by MMseqs2 clusters at 0.3 identity",
        "proteins (train / val / test)": "800 / 100 / 100",
        "PTM sites (train / val / test)": "2,500 / 300 / 310",
        "ESM-2 model": "esm2_t33_650M_UR50D",
        "model": "bidirectional_mamba, d_model 768, 24 layers, 123,456 parameters",
        "optimiser steps": "300 of max_steps 300 (3 epochs)",
        "validation loss": f"{4.0 * math.exp(-2) + 1.1:.4g} at step 300 (the lowest: best.ckpt)",
        "test loss": "1.2 (perplexity 3.32) with best.ckpt",
        "test accuracy": "0.7 of all masked tokens",
        "test PTM accuracy": "0.3 of 48 masked PTM sites (3 types)",
    }
    assert len(rows) <= 13  # short enough for the report's front page


def test_run_summary_of_a_run_in_progress_says_what_is_missing(tmp_path):
    rising = synthetic_metrics(with_test=False)
    for r in rising:  # the last validation is not the lowest: both are shown
        if r.get("Step") == 300 and "avg_val_loss" in r:
            r["avg_val_loss"] = 9.0
    rows = dict(report.run_summary(write_metrics(tmp_path / "m.json", rising)))
    assert rows["proteins (train / val / test)"] == "800 / 100 / 100"  # from the metrics header
    assert rows["validation loss"].startswith("9 at the last validation (step 300); ")
    assert "at step 250 (the lowest: best.ckpt)" in rows["validation loss"]
    assert rows["test"].startswith("not scored yet")
    assert "run" not in rows and "trained" not in rows  # no config, no provenance given
    empty = dict(report.run_summary(write_metrics(tmp_path / "e.json", [])))
    assert empty == {"optimiser steps": "none recorded yet", "validation loss": "no validation yet",
                     "test": empty["test"]}
    no_sites = dict(report.run_summary(write_metrics(tmp_path / "n.json", synthetic_metrics(by_type={}))))
    assert no_sites["test PTM accuracy"] == "0.3"


def test_the_run_summary_page_has_every_row(tmp_path):
    files = write_run_files(tmp_path, synthetic_metrics())
    rows = report.run_summary(files["metrics"], files["summary"], files["config"], files["provenance"])
    page = parse_page(report.summary_html(rows, tmp_path / "run_summary.html"))
    assert page.rows == [list(r) for r in rows]
    assert "<title>Run demo at a glance</title>" in (tmp_path / "run_summary.html").read_text()


def test_test_results_page_shows_every_row_of_the_tsv_as_cells(tmp_path):
    by_type = {**BY_TYPE, "<A&B <x>>": {"sites": 2, "acc": 0.75}}  # a name that needs escaping
    metrics = write_metrics(tmp_path / "metrics.json", synthetic_metrics(by_type=by_type))
    tsv = report.test_results_table(metrics, tmp_path / "test_results.tsv")
    page = parse_page(report.test_results_html(tsv, tmp_path / "test_results.html"))
    rows = read_tsv(tsv)
    overall = [[r["metric"], r["sites"], r["value"]] for r in rows if r["scope"] == "all"]
    per_type = [[r["scope"], r["sites"], r["value"], ""] for r in rows if r["scope"] != "all"]  # "" : the bar
    assert page.rows == [["metric", "sites", "value"], *overall, ["PTM type", "sites", "accuracy", ""], *per_type]
    assert ["A&B <x>", "2", "0.75", ""] in page.rows
    html = (tmp_path / "test_results.html").read_text()
    assert "A&amp;B &lt;x&gt;" in html and 'style="width:75.0%"' in html and 'style="width:25.0%"' in html

    empty = write_metrics(tmp_path / "empty.json", synthetic_metrics(with_test=False))
    tsv = report.test_results_table(empty, tmp_path / "empty.tsv")
    page = parse_page(report.test_results_html(tsv, tmp_path / "empty.html"))
    assert page.rows == [] and "No test results yet" in (tmp_path / "empty.html").read_text()


def test_table_pages_right_align_numbers_and_bold_the_total(tmp_path):
    tsv = tmp_path / "splits.tsv"
    tsv.write_text("split\tptm_sites\tfingerprint\ntrain\t32\tab12\ntest\t8\t\ntotal\t40\t\n")
    out = report.table_html(tsv, tmp_path / "splits.html", "Split sizes", "a note")
    page = parse_page(out)
    assert page.rows == [["split", "ptm sites", "fingerprint"], ["train", "32", "ab12"], ["test", "8", ""],
                         ["total", "40", ""]]
    assert page.row_classes == [None, None, None, "total"]
    html = out.read_text()
    assert '<th class="num">ptm sites</th>' in html and '<td class="num">32</td>' in html
    assert "<td>ab12</td>" in html  # text is not a number


def test_embeddings_page_has_a_column_per_file(tmp_path):
    write_store(tmp_path / "val.h5", [30, 12])
    tsv = report.embedding_stats([tmp_path / "val.h5", tmp_path / "val.h5"], tmp_path / "embeddings.tsv")
    page = parse_page(report.embeddings_html(tsv, tmp_path / "embeddings.html"))
    table = [line.split("\t") for line in tsv.read_text().splitlines()]
    assert page.rows == [["", *(row[0] for row in table[1:])],  # column names to read: "_" as spaces
                         *[[name.replace("_", " "), *(row[i] for row in table[1:])]
                           for i, name in enumerate(table[0]) if i > 0]]


def test_provenance_page_groups_items_under_their_section(tmp_path):
    files = write_run_files(tmp_path, [])
    tsv = report.provenance_table(files["provenance"], tmp_path / "provenance.tsv")
    page = parse_page(report.provenance_html(tsv, tmp_path / "provenance.html"))
    assert page.rows[:4] == [["item", "value"], ["created", "2026-01-02T03:04:05+00:00"], ["dataset"],
                             ["path", "datasets/ptm.csv"]]
    sections = [row[0] for row, cls in zip(page.rows, page.row_classes) if cls == "section"]
    assert sections == ["dataset", "runtime", "code", "packages", "settings.train", "settings.split"]
    assert ["training.lr", "0.001"] in page.rows and ["mamba-ssm", ""] in page.rows
    values = {row[1] for row in page.rows if len(row) == 2}
    assert {row["value"] for row in read_tsv(tsv)} <= values


def test_config_page_is_the_config_file_as_it_is(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("# a comment <with> & marks\nrun_name: x\ndataset:\n  dataset_location: a b.csv\n"
                      "training:\n  adam_betas:\n  - 0.9\n  - 0.98\n")
    out = report.config_html(config, tmp_path / "config.html")
    page = parse_page(out)
    assert page.pre == config.read_text().rstrip("\n")
    html = out.read_text()
    assert '<span class="k">dataset_location</span>: a b.csv' in html
    assert '<span class="c"># a comment &lt;with&gt; &amp; marks</span>' in html
    with pytest.raises(PipelineError, match="missing.yaml: config not found"):
        report.config_html(tmp_path / "missing.yaml", tmp_path / "x.html")


# ----------------------------------------------------------------------------- command line

def test_plots_subcommand_writes_figures_and_tables(tmp_path):
    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers())
    metrics = write_metrics(tmp_path / METRICS_FILE, synthetic_metrics())
    store = split_store_path(tmp_path, "val")
    write_store(store, [20, 30])
    summary = split_paths(tmp_path)["summary"]
    summary.write_text(json.dumps({"splits": {"train": {
        "sequences": 2, "residues": 50, "ptm_sites": 3, "max_length": 30}}}))
    args = parser.parse_args(["plots", "--metrics", str(metrics), "--summary", str(summary),
                              "--embeddings", str(store), "--output-dir", str(tmp_path / "o")])
    args.func(args)
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    files = report_files(tmp_path / "o")
    assert written == sorted(files[key].name for key in [*report.FIGURES, *(
        f"{t}{html}" for t in ("test_results", "splits", "embeddings", "run_summary") for html in ("", "_html"))])


def test_ptm_mamba_plots_cli(tmp_path):
    """Through the installed command line (needs the `plots` subcommand hooked into cli.py)."""
    metrics = write_metrics(tmp_path / "metrics.json", synthetic_metrics(with_test=False))
    result = run_cli("plots", "--metrics", metrics, "--output_dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    files = report_files(tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(
        files[key].name for key in [*report.FIGURES, "test_results", "test_results_html", "run_summary",
                                    "run_summary_html"])
    (tmp_path / "broken.json").write_text("{")
    result = run_cli("plots", "--metrics", tmp_path / "broken.json", "--output_dir", tmp_path / "o")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "broken.json" in result.stderr


def test_the_test_line_legend_keeps_four_decimals():
    """A test loss of 3.026 or 3.0 reads as such in the legend, not rounded to '= 3'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for value in (3.026, 3.0):
        report._test_line(ax, report.RunMetrics(test={"avg_test_loss": value}), "avg_test_loss", "test loss", "green")
    assert [line.get_label() for line in ax.lines] == ["test loss = 3.0260", "test loss = 3.0000"]
    plt.close(fig)


def test_report_file_names():
    """The names users, captions and workflow/report/workflow.rst (a template: it cannot import layout)
    know the report's files by."""
    names = [path.name for path in report_files("r").values()]
    assert names == ["loss.png", "accuracy.png", "learning_rate.png", "throughput.png", "test_ptm_accuracy.png",
                     *(f"{t}.{ext}" for t in ("test_results", "splits", "embeddings", "provenance", "run_summary")
                       for ext in ("tsv", "html")), "config.html"]
    front_page = (REPO / "workflow" / "report" / "workflow.rst").read_text()
    for key in ("run_summary", "run_summary_html"):
        assert f'"{report_files("r")[key].name}"' in front_page
