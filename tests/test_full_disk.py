"""A full disk, for real: every writer of the pipeline run through the CLI onto a small tmpfs
that its output overflows. Each must end with exit 2 and one line on stderr naming the file it
was writing and the free space of the file system (no traceback, no crash), and leave neither
a file under the final name nor its temp file.

Mounting a tmpfs needs root (or CAP_SYS_ADMIN); elsewhere these tests are skipped, saying so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import demo_subset, error_line, run_cli, write_config
from ptm_mamba import checkpoint as ckpt
from ptm_mamba.errors import PipelineError
from ptm_mamba.fileio import WriteError, atomic_write_json, write_error
from ptm_mamba.layout import LAST_CKPT, METRICS_FILE, shard_path, split_csv, split_store_path
from ptm_mamba.testing import write_tiny_esm2_checkpoint

SIZE = 256 * 1024  # the tmpfs: every output below is bigger, or the disk is filled first
FULL = "no space left on device"


@pytest.fixture
def disk(tmp_path) -> Path:
    """A 256 KiB tmpfs mounted at ``tmp_path/disk`` (unmounted afterwards)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount_point)],
                                capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no `mount` command: cannot make a small file system to fill")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a {SIZE // 1024} KiB tmpfs to fill (needs root or CAP_SYS_ADMIN): "
                    f"{result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until about ``leave`` bytes are free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def files_under(disk: Path) -> list[str]:
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file() and p.name != "filler")


def without_progress(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result`` without the progress bars on stderr (ESM-2's, which embed-shard always draws)."""
    parts = re.split(r"[\r\n]", result.stderr)
    kept = [p for p in parts if p.strip() and not re.search(r"\d+%\|", p)]
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout,
                                       "".join(f"{p}\n" for p in kept))


def refused(result: subprocess.CompletedProcess, final: Path, disk: Path) -> str:
    """The one-line refusal naming ``final`` and the free space of ``disk``; nothing written is left."""
    line = error_line(without_progress(result), f"error: {final}: {FULL} (", f"free on {disk})")
    assert re.search(r"\(\d+(\.\d)? (B|KiB) free on ", line), line
    assert not final.exists()
    assert files_under(disk) == [], files_under(disk)  # no temp file (.NAME.tmp-*) either
    return line


# ----------------------------------------------------------------------------- HDF5 writers

def test_predict_onto_a_full_disk_is_one_line(checkpoint, disk, tmp_path):
    """The original segfaulted (exit 139) after printing HDF5's error: here in a process of its own."""
    sequences = demo_subset(tmp_path / "in.csv", 150, max_len=1000)  # ~60k residues: ~2 MiB of states
    out = disk / "pred.h5"
    result = run_cli("predict", "--checkpoint", checkpoint, "--input", sequences, "--output", out,
                     "--device", "cpu", "--no_progress", own_process=True, timeout=300)
    refused(result, out, disk)


def test_embed_shard_onto_a_full_disk_is_one_line(embedded_project, disk):
    root, _ = embedded_project
    out = disk / "shards" / "train_0.h5"  # ~380 KiB
    result = run_cli("embed-shard", "--config", root / "config.yaml", "--split", "train",
                     "--split_file", split_csv(root / "split", "train"), "--shard", "0", "--num_shards", "2",
                     "--output", out, own_process=True, timeout=300)
    refused(result, out, disk)


@pytest.mark.parametrize("leave", [0, 2048, 6144])
def test_gather_onto_a_full_disk_is_one_line(embedded_project, disk, leave):
    root, config = embedded_project
    shards = sorted(shard_path(root / "embeddings", "train", 0, config["embedding"]["shards"]).parent.glob("*.h5"))
    assert len(shards) == config["embedding"]["shards"]
    fill(disk, leave)  # the gathered file (a copy of the shards' rows) fails somewhere along its copy
    out = split_store_path(disk, "train")
    result = run_cli("gather", "--config", root / "config.yaml", "--split", "train",
                     "--split_file", split_csv(root / "split", "train"), "--shards", *shards, "--output", out,
                     own_process=True, timeout=300)
    refused(result, out, disk)


# ----------------------------------------------------------------------------- checkpoints, metrics, CSVs

def test_checkpoint_save_onto_a_full_disk(disk):
    state = {"format_version": ckpt.FORMAT_VERSION, "model": {"w": torch.randn(100_000)}}  # 400 KB
    with pytest.raises(WriteError) as err:
        ckpt.save(state, disk / "run" / LAST_CKPT)
    message = str(err.value)
    assert message.startswith(f"{disk / 'run' / LAST_CKPT}: {FULL} (") and f"free on {disk})" in message
    assert isinstance(err.value, PipelineError) and isinstance(err.value, OSError)
    assert files_under(disk) == []
    ckpt.save({"w": torch.zeros(10)}, disk / "run" / "small.ckpt")  # the space is back
    assert files_under(disk) == ["run/small.ckpt"]


def test_metrics_json_onto_a_full_disk(disk):
    fill(disk, 0)
    with pytest.raises(WriteError, match=rf"^{re.escape(str(disk / METRICS_FILE))}: {FULL} \(0 B free on "):
        atomic_write_json(disk / METRICS_FILE, {"loss": list(range(10_000))})
    assert files_under(disk) == []


@pytest.mark.parametrize("leave", [0, 24 * 1024, 200 * 1024])  # config.yaml, best.ckpt, last.ckpt fail
def test_train_onto_a_full_disk_is_one_line(embedded_project, disk, tmp_path, leave):
    """The run's writes (config, mapping, provenance, metrics, checkpoints, the resume state): the
    first that does not fit ends the run in one line naming it; none is left half-written."""
    root, config = embedded_project
    cfg = dict(config, run_name="full")
    cfg["training"] = dict(config["training"], output_dir=str(disk / "outputs"), max_steps=2, log_steps=2)
    path = write_config(tmp_path / "c.yaml", **cfg)
    fill(disk, leave)
    result = run_cli("train", "--config", path, "--split_dir", root / "split", "--no_progress")
    line = error_line(result, FULL, f"free on {disk})")
    final = Path(re.match(r"error: (.+?): no space left", line).group(1))
    assert disk in final.parents and not final.exists(), line
    assert not [f for f in files_under(disk) if ".tmp-" in f], files_under(disk)
    for name in files_under(disk):  # what was written is whole
        if name.endswith(".ckpt"):
            torch.load(disk / name, weights_only=True)


def test_import_original_onto_a_full_disk_is_one_line(disk, tmp_path):
    from test_import_original import save_original

    esm = write_tiny_esm2_checkpoint(tmp_path / "esm2_t2_16.pt", 2, 16, 2)
    source = save_original(tmp_path / "original.ckpt")
    fill(disk, 8192)
    out = disk / "imported.ckpt"
    result = run_cli("import-original", "--checkpoint", source, "--output", out, "--esm-model", esm)
    refused(result, out, disk)


def test_prepare_onto_a_full_disk_is_one_line(disk, tmp_path):
    """The CSV (~330 KB) and its summary are written as one unit: neither appears."""
    rows = [("Entry", "Sequence", "Modified residue", "Glycosylation", "Lipidation")]
    rows += [(f"P{i:05d}", "MS" + "ACDEFGHIKLMNPQRSTVWY" * 5, 'MOD_RES 2; /note="Phosphoserine"', "", "")
             for i in range(3000)]
    source = tmp_path / "uniprot.tsv"
    source.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    out = disk / "dataset.csv"
    result = run_cli("prepare", "--format", "uniprot_tsv", "--input", source, "--output", out)
    refused(result, out, disk)


def test_split_onto_a_full_disk_is_one_line(disk, tmp_path):
    data = demo_subset(tmp_path / "data.csv", 300, max_len=1000)
    config = write_config(tmp_path / "c.yaml", dataset={"dataset_location": str(data), "val_size": 10,
                                                        "test_size": 10})
    fill(disk, 16 * 1024)
    result = run_cli("split", "--config", config, "--output_dir", disk / "split")
    line = error_line(result, FULL, f"free on {disk})")
    final = Path(re.match(r"error: (.+?): no space left", line).group(1))
    assert final.parent == disk / "split", line
    assert files_under(disk) == []  # the split's files are one unit: none of them


# ----------------------------------------------------------------------------- the message itself

def test_write_error_reads_hdf5_and_quota_failures(tmp_path):
    """HDF5 puts the system's errno inside its message (errno unset on the exception); a quota is
    named as such; the free space is that of the file system holding the file."""
    hdf5 = OSError(None, "Can't flush cache (file write failed: time = Thu Dec  3 08:00:10 2026\n, filename = "
                         "'/x/.s.h5.tmp-1', file descriptor = 3, errno = 28, error message = 'No space left on "
                         "device', buf = 0x55, total write size = 16388)")
    line = str(write_error(tmp_path / "s.h5", hdf5))
    assert line.startswith(f"{tmp_path / 's.h5'}: {FULL} (") and " free on /" in line and "\n" not in line
    quota = str(write_error(tmp_path / "m.json", OSError(122, "Disk quota exceeded")))
    assert quota.startswith(f"{tmp_path / 'm.json'}: disk quota exceeded (")
    denied = str(write_error(tmp_path / "m.json", PermissionError(13, "Permission denied", "/x/.m.json.tmp-1")))
    assert denied.startswith(f"{tmp_path / 'm.json'}: Permission denied (")


def test_an_unwritable_folder_is_one_line_naming_the_file(tmp_path):
    """Not a full disk, but a write the file system refuses all the same (a folder that is a file)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    source = tmp_path / "u.tsv"
    source.write_text("Entry\tSequence\tModified residue\tGlycosylation\tLipidation\n"
                      'P1\tMKS\tMOD_RES 3; /note="Phosphoserine"\t\t\n')
    out = blocker / "dataset.csv"
    result = run_cli("prepare", "--format", "uniprot_tsv", "--input", source, "--output", out)
    error_line(result, f"error: {out}: ", "free on /")


def test_an_hdf5_error_without_errno_on_a_full_disk_reads_as_one(disk):
    """h5py sometimes raises without an errno and without the system's words (a RuntimeError's
    text): on a file system with (almost) no space left, that is a full disk."""
    fill(disk, 0)
    line = str(write_error(disk / "s.h5", OSError(None, "Can't flush cache (file write failed)\nmore")))
    assert line == f"{disk / 's.h5'}: {FULL} (0 B free on {disk})"


def test_an_os_error_reaching_the_cli_is_one_line(disk):
    """The CLI's last resort for an OSError no writer turned into a WriteError."""
    from ptm_mamba.fileio import os_error_line

    fill(disk, 0)
    assert os_error_line(OSError(28, "No space left on device", str(disk / "x.log"))) == \
        f"{disk / 'x.log'}: {FULL} (0 B free on {disk})"
    assert os_error_line(FileNotFoundError(2, "No such file or directory", "in.csv")) == \
        "in.csv: No such file or directory"
    assert os_error_line(OSError(None, "HDF5 said\nthis")) == "HDF5 said this"
