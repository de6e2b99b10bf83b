"""The Snakemake workflow end to end on tiny data: split -> embed -> train, reruns, resume, and the
state of a run under the ways it goes wrong in use: other invocations during a run, deleted
outputs, kills at random moments."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_config, write_config
from ptm_mamba import layout
from ptm_mamba.train import without_throughput

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]
RUN = str(layout.run_dir("out dir", "wf"))  # folders with a space: the rules must quote paths
EMB = "emb dir"
RUN_FILES = layout.RUN_FILES
REPORT = layout.report_dir("wf")  # the report of the run, relative to the project folder


def command(workdir: Path, *args: str) -> list[str]:
    # targets and options first: --configfile takes every word after it
    return [*SNAKEMAKE, *args, "--directory", str(workdir), "--configfile", str(workdir / "config.yaml")]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command(workdir, *args), capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def planned(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Jobs per rule from a dry run's job table ({} for "Nothing to be done")."""
    jobs, table = {}, False
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("job ") and "count" in line:
            table = True
            continue
        if table:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
                jobs[parts[0]] = int(parts[1])
            elif parts and parts[0] == "total":
                break
    return jobs


def shards(root: Path) -> list[Path]:
    """The embed jobs' shards left under the embeddings folder (temp(): none once gathered)."""
    return list(root.glob(str(layout.shard_path(EMB, "*", "*", "*"))))


def files_of(root: Path) -> dict[str, int]:
    """Every file under ``root`` but Snakemake's own folder, with its mtime."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and ".snakemake" not in p.parts}


def outputs(root: Path) -> dict:
    """What a finished run produced, in comparable form: split files, stored embeddings, the run's
    files (checkpoints as tensors), the report's tables."""
    from ptm_mamba.embedding_store import EmbeddingReader

    out: dict = {f"split/{key}": path.read_bytes() for key, path in layout.split_paths(root / layout.SPLIT_DIR).items()}
    for split in layout.SPLITS:
        with EmbeddingReader(layout.split_store_path(root / EMB, split)) as store:
            out[f"emb/{split}"] = [(i, [np.asarray(a) for a in store.get(i, k)])
                                   for i in store.ids for k in range(store.attrs["mask_replicates"])]
    run = layout.run_files(root / RUN)
    for n in (layout.CONFIG_FILE, layout.SPLIT_MAPPING):
        out[f"run/{n}"] = run[n].read_bytes()
    out["run/metrics"] = without_throughput(json.loads(run[layout.METRICS_FILE].read_text()))
    for n in (layout.BEST_CKPT, layout.LAST_CKPT):
        out[f"run/{n}"] = torch.load(run[n], weights_only=True)["model"]
    report = layout.report_files(root / REPORT)
    for n in ("splits", "test_results"):
        out[f"report/{n}"] = report[n].read_bytes()
    return out


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("emb/"):
            assert [i for i, _ in a[key]] == [i for i, _ in b[key]], key
            for (_, x), (_, y) in zip(a[key], b[key]):
                assert all(np.array_equal(u, v) for u, v in zip(x, y)), key
        elif key.endswith(".ckpt"):
            assert a[key].keys() == b[key].keys()
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        else:
            assert a[key] == b[key], key


def same_config_in(workdir: Path, root: Path) -> Path:
    """A new project folder with the reference's config (same data, same ESM-2 file)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(workdir / "config.yaml", root / "config.yaml")
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The reference: one uninterrupted run of the whole DAG, split by MMseqs2 clusters (the default random
    split runs through the DAG in tests/test_slurm.py)."""
    root = tmp_path_factory.mktemp("workflow")
    config = tiny_config(root, n=48, run_name="wf", training={"embeddings_dir": EMB, "output_dir": "out dir"},
                         dataset={"split_by": "cluster"}, evaluate={"min_sites": 4, "bootstrap": 200})
    write_config(root / "config.yaml", **config)
    snakemake(root)
    return root


@pytest.fixture(scope="module")
def reference(workdir) -> dict:
    return outputs(workdir)


def test_full_dag_runs_and_writes_every_output(workdir):
    for name in RUN_FILES:
        assert (workdir / RUN / name).is_file(), name
    for split in layout.SPLITS:
        assert layout.split_store_path(workdir / EMB, split).is_file()
    assert not shards(workdir)  # the shards are temp(): gone once gathered
    assert (workdir / "logs" / "split.log").is_file()
    assert (workdir / "logs" / "train" / "wf.log").is_file()
    # the jobs read the config of this invocation, from a file named by its content
    configs = list((workdir / layout.CONFIGS_DIR).iterdir())
    assert len(configs) == 1 and configs[0].read_text() == (workdir / RUN / layout.CONFIG_FILE).read_text()


def test_the_run_is_evaluated_on_its_test_split_with_folds_by_cluster(workdir):
    """The evaluate stage is part of the default target; with split_by: cluster its folds keep clusters whole."""
    files = layout.evaluation_outputs(workdir / layout.evaluation_dir("wf"))
    record = json.loads(files["ptm_sites.json"].read_text())
    assert record["run_name"] == "wf" and record["grouped_by"] == "cluster"
    assert record["checkpoint"] == str(Path(RUN) / layout.BEST_CKPT)
    assert record["tasks"] and all(t["sites"] >= 4 for t in record["tasks"])
    assert len(files["ptm_sites.tsv"].read_text().splitlines()) == 1 + 3 * len(record["tasks"])
    assert files["ptm_sites.png"].read_bytes()[:4] == b"\x89PNG" and files["ptm_sites.html"].is_file()


def test_snakemake_report_shows_the_figures_and_tables(workdir):
    """`snakemake --report report.html` of the finished run: one self-contained file."""
    from test_report import png_shape, read_tsv

    snakemake(workdir, "--report", "report.html")
    out, files = workdir / REPORT, layout.report_files(REPORT)  # files: as the report names them
    for name in layout.REPORT_FIGURES:
        png_shape(workdir / files[name])
    assert len(read_tsv(workdir / files["embeddings"])) == 3
    html = (workdir / "report.html").read_text(encoding="utf-8")
    # its tables, rendered, opened as a person does in headless Chromium (tests/test_report_html.py)
    from test_report_html import assert_report_shows_tables, find_chromium

    if find_chromium() is None:
        pytest.skip("Chromium is not installed: run `sudo scripts/install_chromium.sh` (Debian's chromium)")
    assert_report_shows_tables(workdir / "report.html", out, workdir / RUN)
    (workdir / "report.html").unlink()
    for name in layout.REPORT_FIGURES:
        assert f'"{files[name].as_posix()}"' in html, name
        assert f"filename={files[name].name};base64,iVBORw0KGgo" in html, name  # the PNG itself, embedded
    for name in ("test_results", "splits", "embeddings"):
        assert f'"{files[name].as_posix()}"' in html, name
    assert f'"{RUN}/{layout.CONFIG_FILE}"' in html  # the run's own config, no copy
    # Captions, rendered (the tables and the config are inlined by them), and the top-level description.
    assert "Masked-token cross-entropy loss per optimiser step" in html
    assert "Test-set accuracy of" in html
    ptm_types = [row["scope"] for row in read_tsv(workdir / files["test_results"]) if row["scope"] != "all"]
    assert ptm_types and all(name in html for name in ptm_types)  # the test_results table in its caption
    assert "run_name: wf" in html  # the run's config.yaml in its caption
    assert "PTM-Mamba training run: wf" in html
    assert "System Message" not in html  # no docutils error rendered into a caption


def test_rerun_does_nothing(workdir):
    result = snakemake(workdir, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.parametrize("override, stages", [
    ("training={lr: 0.001}", {"train", "evaluate_run", "plots", "all"}),  # a nested number, typed by the schema
    ("seed=7", {"train", "evaluate_run", "plots", "all"}),
    ("training={mask_prob: 0.2}", {"embed_shard", "gather_embeddings", "train", "evaluate_run", "plots", "all"}),
    ("embedding={dtype: int8}", {"embed_shard", "gather_embeddings", "train", "evaluate_run", "plots", "all"}),
    ("embedding={dtype: float16}", set()),  # the default, written out
    ("dataset={split_seed: 1}", {"split", "embed_shard", "gather_embeddings", "train", "evaluate_run", "plots",
                                 "all"}),
    ("training={num_workers: 1}", set()),                                       # how, not what: reruns nothing
    ("embedding={max_tokens_per_batch: 2000, batch_size: 3}", set()),
    ("evaluate={folds: 3}", {"evaluate_run", "all"}),                            # the probes only
])
def test_a_setting_reruns_exactly_the_stages_that_read_it(workdir, override, stages):
    assert set(planned(snakemake(workdir, "-n", "--config", override))) == stages


@pytest.mark.parametrize("deleted, stages", [
    (f"{RUN}/{layout.METRICS_FILE}", {"train", "evaluate_run", "plots", "all"}),
    (f"{RUN}/{layout.SPLIT_MAPPING}", {"train", "evaluate_run", "plots", "all"}),
    (f"{RUN}/{layout.CONFIG_FILE}", {"train", "evaluate_run", "plots", "all"}),
    (layout.split_store_path(EMB, "val"), {"embed_shard", "gather_embeddings", "train", "evaluate_run", "plots",
                                           "all"}),  # its shards are temp()
    (layout.split_paths(layout.SPLIT_DIR)["mapping"], {"split", "embed_shard", "gather_embeddings", "train",
                                                       "evaluate_run", "plots", "all"}),
    (layout.evaluation_files("wf")["ptm_sites.json"], {"evaluate_run", "all"}),
    (layout.split_csv(layout.SPLIT_DIR, "test"), {"split", "embed_shard", "gather_embeddings", "train", "evaluate_run",
                                                  "plots", "all"}),
])
def test_a_deleted_output_is_rebuilt_with_what_depends_on_it(workdir, tmp_path, deleted, stages):
    path = workdir / deleted
    shutil.move(path, tmp_path / "saved")
    try:
        assert set(planned(snakemake(workdir, "-n"))) == stages
    finally:
        shutil.move(tmp_path / "saved", path)


def test_a_deleted_metrics_file_comes_back(workdir, reference):
    (workdir / RUN / layout.METRICS_FILE).unlink()
    snakemake(workdir)
    assert without_throughput(json.loads((workdir / RUN / layout.METRICS_FILE).read_text())) == reference["run/metrics"]
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(workdir, "-n"))


def test_parsing_writes_nothing(workdir):
    """A dry run with other settings, --lint and --report write no file that a job reads."""
    before = files_of(workdir)
    snakemake(workdir, "-n", "--config", "seed=7", "training={lr: 0.5}")
    snakemake(workdir, "--lint", check=False)
    before_report = files_of(workdir)
    snakemake(workdir, "--report", str(workdir / "report.html"))
    assert files_of(workdir) == {**before_report, "report.html": files_of(workdir)["report.html"]}
    assert before == before_report


def test_config_mistakes_are_one_line(workdir, tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text((workdir / "config.yaml").read_text() + "seed: 3\nseed: 4\n")
    duplicate = subprocess.run([*SNAKEMAKE, "-n", "--directory", str(workdir), "--configfile", str(bad)],
                               capture_output=True, text=True, timeout=300)
    not_a_number = snakemake(workdir, "-n", "--config", "training={lr: abc}", check=False)
    for result, words in ((duplicate, "duplicate key 'seed'"), (not_a_number, "training.lr: 'abc'")):
        lines = [line for line in result.stderr.splitlines()
                 if line.strip() and not line.startswith("Using workflow specific profile")]  # Snakemake's
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and words in lines[0], lines[0]


def test_deleting_one_gathered_file_reruns_only_its_shards_and_its_gather(workdir):
    """The shards are temporary: a deleted {split}_embeddings.h5 is made again from its split's shards,
    computed again (and deleted again), nothing else; the same values as before."""
    from ptm_mamba.embedding_store import EmbeddingReader

    path = layout.split_store_path(workdir / EMB, "val")
    with EmbeddingReader(path) as store:
        before = [(i, k, *store.get(i, k)) for i in store.ids for k in range(store.attrs["mask_replicates"])]
    before_bytes = path.read_bytes()
    path.unlink()
    result = snakemake(workdir, "embeddings")
    out = (result.stdout + result.stderr).replace("localrule", "rule")
    assert out.count("rule embed_shard:") == 2 and out.count("rule gather_embeddings:") == 1, out
    assert "wildcards: split=val, shard=0" in out and "wildcards: split=val, shard=1" in out, out
    assert "split=train" not in out and "split=test" not in out, out
    assert "rule split" not in out and "rule train" not in out, out
    assert not shards(workdir)
    with EmbeddingReader(path) as store:
        after = [(i, k, *store.get(i, k)) for i in store.ids for k in range(store.attrs["mask_replicates"])]
    assert [(i, k) for i, k, _, _ in after] == [(i, k) for i, k, _, _ in before]
    assert all(np.array_equal(x, y) and np.array_equal(m, n) for (_, _, x, m), (_, _, y, n) in zip(after, before))
    # the same bytes, even: here train's inputs are small enough for Snakemake to keep their checksums
    # (--max-checksum-file-size, 1 MB), so training does not rerun; larger ones rerun it by their mtime
    assert path.read_bytes() == before_bytes
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(workdir, "-n"))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the moment the test waits for"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_other_invocations_and_kills_during_a_run_change_nothing(workdir, reference, tmp_path):
    """A run of the whole DAG as it goes in use. While it embeds, a dry run with other settings and a
    second, locked-out run (its jobs still get the first run's settings). Then chaos: SIGKILL to
    Snakemake and its jobs at seeded random moments, each time restarted (with --unlock, as
    Snakemake asks). The last kill lands inside training (after a random part of it), where the
    resume state matters. The outputs equal the uninterrupted run's."""
    root = same_config_in(workdir, tmp_path / "chaos")
    rng = random.Random(20261201)
    train_log = root / "logs" / "train" / "wf.log"
    kills = []

    def run_and_kill(when) -> None:
        proc = subprocess.Popen(command(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            when(proc)
            proc.wait(timeout=rng.uniform(0.5, 4.0))
        except subprocess.TimeoutExpired:
            kills.append(sorted(p.name for p in (root / "logs").rglob("*.log")))
            os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and every job, as a node failure would
            proc.wait()
        snakemake(root, "--unlock")

    def other_invocations(proc) -> None:
        wait_for(lambda: (root / "logs" / "embed").is_dir(), proc)
        snakemake(root, "-n", "--config", "seed=7")
        second = snakemake(root, "--config", "seed=7", check=False)
        assert second.returncode != 0 and "lock" in (second.stdout + second.stderr).lower()

    run_and_kill(other_invocations)
    for _ in range(2):
        run_and_kill(lambda proc: time.sleep(rng.uniform(0.5, 6.0)))
    run_and_kill(lambda proc: wait_for(train_log.exists, proc))
    assert len(kills) >= 3 and "wf.log" in kills[-1], kills
    snakemake(root)
    assert len(list((root / layout.CONFIGS_DIR).iterdir())) == 1  # the seed=7 invocations wrote none
    assert_same_outputs(outputs(root), reference)
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(root, "-n"))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """Snakemake's refusal of a config: exit non-zero, one line ``error: ...`` (Snakemake's own notes aside)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()
             and not line.startswith(("Using workflow specific profile", "Config file"))]
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def run_folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root / RUN)): p.read_bytes() for p in (root / RUN).rglob("*") if p.is_file()}


@pytest.mark.parametrize("key, file", [("init_from", layout.BEST_CKPT), ("resume_from_checkpoint", layout.LAST_CKPT),
                                       ("init_from", "link to best.ckpt")])
def test_a_fine_tune_from_its_own_run_folder_is_refused_before_anything_is_deleted(workdir, key, file):
    """The same run_name, starting from a checkpoint of that run: Snakemake would rerun train and delete
    the run first. Refused when the workflow starts; the finished run intact byte for byte."""
    before = run_folder_bytes(workdir)
    link = workdir / "link to best.ckpt"
    link.unlink(missing_ok=True)
    link.symlink_to(workdir / RUN / layout.BEST_CKPT)  # a symlink into the run folder counts as the folder
    path = link if file.startswith("link") else workdir / RUN / file
    for args in (("-n",), ()):
        line = one_error_line(snakemake(workdir, *args, "--config", f"training={{{key}: '{path}'}}", check=False))
        assert f"training.{key} {path} lies in the run folder {RUN}/" in line and "new run_name" in line, line
    assert run_folder_bytes(workdir) == before
    link.unlink()


def test_another_project_sharing_the_run_folder_neither_adopts_nor_replaces_it(workdir, tmp_path):
    """Project B shares output_dir and run_name with the finished run of project A (workdir)."""
    before = run_folder_bytes(workdir)
    config = yaml_config(workdir)
    config["training"]["output_dir"] = str(workdir / "out dir")
    b = tmp_path / "project b"
    b.mkdir()
    write_config(b / "config.yaml", **{**config, "dataset": {**config["dataset"], "split_seed": 7}})
    for args in (("-n",), (), ("--report", str(b / "report.html"))):
        line = one_error_line(snakemake(b, *args, check=False))
        assert f"{workdir / RUN} holds a run of the project in {workdir.resolve()}" in line, line
        assert "dataset.split_seed: 42 there, 7 here" in line and "neither adopt nor replace" in line, line
    assert run_folder_bytes(workdir) == before and not (b / "results").exists()
    # the same settings in another folder: the same computation, which it may share
    write_config(b / "config.yaml", **config)
    snakemake(b, "-n")


def yaml_config(workdir: Path) -> dict:
    import yaml

    return yaml.safe_load((workdir / "config.yaml").read_text())


@pytest.mark.parametrize("override, says", [
    ("dataset={dataset_location: nonexistent.csv}", "dataset.dataset_location: nonexistent.csv not found"),
    ("esm={model: missing/esm2_t2_tiny.pt}", "esm.model: missing/esm2_t2_tiny.pt not found"),
    ("training={init_from: missing.ckpt}", "training.init_from: missing.ckpt not found"),
    ("predict={inputs: [missing.fasta]}", "predict.inputs (missing.fasta): missing.fasta not found"),
])
def test_a_missing_input_is_one_line_never_nothing_to_be_done(workdir, override, says):
    for args in (("-n",), ()) if override.startswith("dataset") else (("-n",),):  # parsing refuses, run or not
        line = one_error_line(snakemake(workdir, *args, "--config", override, check=False))
        assert says in line, line


def test_the_end_of_a_workflow_says_how_the_run_did_or_why_a_job_failed(workdir, tmp_path):
    out = snakemake(workdir, "--forcerun", "plots").stdout  # a run with a job (none: no onsuccess)
    metrics = json.loads((workdir / RUN / layout.METRICS_FILE).read_text())
    test = next(r for r in reversed(metrics) if "avg_test_loss" in r)
    assert f"PTM-Mamba run {Path(RUN).name}: test loss {test['avg_test_loss']:.4f}" in out, out
    assert f"outputs: {RUN}/" in out and "snakemake --report report.html" in out, out
    # a job that fails with a one-line error: that line is on the screen, not only in its log
    root = same_config_in(workdir, tmp_path / "fails")
    result = snakemake(root, "--config", "embedding={window: 16, overlap: 20}", check=False)
    assert result.returncode != 0
    shown = [line for line in result.stderr.splitlines() if "error: embedding.overlap (20)" in line]
    assert shown and shown[0].startswith("logs/embed/"), result.stderr[-3000:]


def test_the_rerun_reason_names_the_keys_that_changed(workdir):
    result = snakemake(workdir, "-n", "--config", "training={lr: 0.001}", "seed=7")
    changes = [line for line in result.stderr.splitlines() if line.startswith("changed since")]
    assert changes == [f"changed since {RUN} was made: train seed: 42 -> 7",
                       f"changed since {RUN} was made: train training.lr: 0.003 -> 0.001"], result.stderr
    assert not [line for line in snakemake(workdir, "-n").stderr.splitlines() if line.startswith("changed since")]
