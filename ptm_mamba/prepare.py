"""The prepare stage: the training CSV (``unique_id,ptm_seq``) from a raw source of PTM annotations.

Formats (``dataset.source.format``):

- ``uniprot_tsv``: a UniProtKB TSV export (plain or .gz) with the columns Entry, Sequence,
  Modified residue, Glycosylation and Lipidation; features are written ``MOD_RES 12;
  /note="Phosphoserine; by PKA"; /evidence="ECO:..."``, positions 1-based.
- ``ptm_mamba_sites``: the original PTM-Mamba's ``ptm_labels.csv``: one row per site with
  ``ori_seq``, ``pos`` and ``token``, optionally ``AC_ID``. ``pos`` is 0-based (its
  ``label_preprocess.py`` subtracts 1). Rows are grouped by ``ori_seq``, as there; the id is the
  first ``AC_ID``, else a hash of the PTM sequence.

The skip rules are in datasets/README.md; skips are counted per reason in ``NAME.summary.json``,
written last beside ``NAME.csv`` with the source it was made from (:func:`check_prepared`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .dataset import ID_COLUMN, SEQUENCE_COLUMN, derived_id
from .errors import PipelineError
from .fileio import write_together
from .settings import Settings
from .hashing import file_sha256, sha256_of
from .layout import prepared_summary_path
from .stages import PREPARE, check_settings, source_identity
from .tokenizer import PTM_RESIDUE, RESIDUES

FORMATS = ("uniprot_tsv", "ptm_mamba_sites")
UNIPROT_COLUMNS = ("Entry", "Sequence", "Modified residue", "Glycosylation", "Lipidation")
SITE_COLUMNS = ("ori_seq", "pos", "token")
# A feature starts a cell or follows a "; ", and its location runs to the next ";".
FEATURE = re.compile(r"(?:^|;\s*)(?:MOD_RES|CARBOHYD|LIPID)\s+([^;\s]+)")
NOTE = re.compile(r'/note="([^"]*)"')

UNCERTAIN, OUTSIDE, NO_NOTE = "uncertain or unreadable position", "position outside the sequence", "no /note"
NOT_IN_VOCABULARY, WRONG_RESIDUE, TAKEN = "not in the vocabulary", "not the PTM's residue", "residue already has a PTM"
NOT_RESIDUES, NO_PTM, REPEATED = "empty sequence or not residues", "no PTM left", "id seen before"


@dataclass
class Entry:
    id: str | None  # None: derived from the PTM sequence
    sequence: str
    sites: list[tuple[int | None, str | None]] = field(default_factory=list)  # (0-based position, token)


@dataclass
class Tally:
    entries: int = 0
    features: int = 0
    skipped_features: Counter = field(default_factory=Counter)
    skipped_entries: Counter = field(default_factory=Counter)
    not_in_vocabulary: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)


def ptm_tokens(entry: Entry, tally: Tally) -> list[str] | None:
    """The entry's residues with its PTM tokens in place, or None when the entry is skipped."""
    seq = entry.sequence
    if not seq or not set(seq) <= set(RESIDUES):
        tally.skipped_entries[NOT_RESIDUES] += 1
        tally.skipped_features[NOT_RESIDUES] += len(entry.sites)
        return None
    tokens = list(seq)
    for pos, token in entry.sites:
        reason = (NO_NOTE if token is None else UNCERTAIN if pos is None
                  else OUTSIDE if not 0 <= pos < len(seq) else NOT_IN_VOCABULARY if token not in PTM_RESIDUE
                  else WRONG_RESIDUE if seq[pos] != PTM_RESIDUE[token] else TAKEN if len(tokens[pos]) > 1 else None)
        if reason is None:
            tokens[pos] = token
            tally.kept[token] += 1
        else:
            tally.skipped_features[reason] += 1
            if reason == NOT_IN_VOCABULARY:
                tally.not_in_vocabulary[token] += 1
    if tokens == list(seq):
        tally.skipped_entries[NO_PTM] += 1
        return None
    return tokens


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise PipelineError(f"source file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")


def _rows(path: Path, delimiter: str, required: tuple[str, ...], what: str) -> Iterator[tuple[int, dict]]:
    """The rows of a delimited file with the line each ends on; UniProt's TSV quotes nothing (its
    notes hold quotes)."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with _open_text(path) as fh:
        reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
        try:
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise PipelineError(f"{path}: no column {missing[0]!r}; {what} has the columns "
                                    f"{', '.join(required)} (the file has: {', '.join(map(repr, header))})")
            for row in reader:
                yield reader.line_num, row
        except UnicodeDecodeError as exc:
            raise PipelineError(f"{path}: not UTF-8 text ({exc.reason})") from None
        except (csv.Error, EOFError, OSError) as exc:  # a broken .gz, an unreadable line
            raise PipelineError(f"{path}: unreadable ({exc})") from None


class PositionError(ValueError):
    """A position with a non-ASCII digit (``int("٣") == 3``, ``int("²")`` fails): a damaged file, not
    a position to guess."""

    def __init__(self, text: str, char: str):
        super().__init__(f"position {text!r} holds {char!r} ({unicodedata.name(char, 'a non-ASCII character')}), "
                         "not a digit 0-9")
        self.text, self.char = text, char


def _ascii_position(text: str) -> str:
    bad = next((ch for ch in text if not ch.isascii() and ch.isnumeric()), None)
    if bad is not None:
        raise PositionError(text, bad)
    return text


# A number in ASCII (what the per-site table's pos column holds: "7", "7.0"); float() also takes
# "1_0", " ٣ ", "nan", which are not positions.
ASCII_NUMBER = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*", re.ASCII)


def uniprot_sites(cell: str) -> list[tuple[int | None, str | None]]:
    """(0-based position or None when uncertain, token or None without a note) per feature of a cell.
    A position with a non-ASCII digit raises :class:`PositionError`."""
    found = list(FEATURE.finditer(cell))
    sites = []
    for m, after in zip(found, [*found[1:], None]):
        note = NOTE.search(cell, m.end(), after.start() if after else len(cell))
        location = _ascii_position(m.group(1))
        readable = location.isascii() and location.isdigit() and len(location) <= 18  # int() refuses 4300+ digits
        sites.append((int(location) - 1 if readable else None,
                      f"<{note.group(1).split(';')[0].strip()}>" if note else None))
    return sites


def read_uniprot_tsv(path: Path) -> Iterator[Entry]:
    for line, row in _rows(path, "\t", UNIPROT_COLUMNS, "a UniProtKB TSV export"):
        sites = []
        for column in UNIPROT_COLUMNS[2:]:
            try:
                sites += uniprot_sites(row[column] or "")
            except PositionError as exc:
                raise PipelineError(f"{path} line {line}: entry {row['Entry'].strip()!r}, column {column!r}: {exc}; "
                                    "write positions with the digits 0-9") from None
        yield Entry(row["Entry"].strip(), (row["Sequence"] or "").strip(), sites)


def read_ptm_mamba_sites(path: Path) -> Iterator[Entry]:
    entries: dict[str, Entry] = {}  # ori_seq -> entry, in order of first appearance
    for line, row in _rows(path, ",", SITE_COLUMNS, "the PTM-Mamba per-site table"):
        seq = (row["ori_seq"] or "").strip().upper()
        entry = entries.setdefault(seq, Entry((row.get("AC_ID") or "").strip() or None, seq))
        text = row["pos"] or ""
        try:
            _ascii_position(text)
        except PositionError as exc:
            raise PipelineError(f"{path} line {line}: column 'pos': {exc}; write positions with the digits 0-9") \
                from None
        pos = float(text) if ASCII_NUMBER.fullmatch(text) else math.nan
        pos = int(pos) if pos.is_integer() else None
        token = (row["token"] or "").strip()
        entry.sites.append((pos, token if token.startswith("<") else f"<{token}>" if token else None))
    yield from entries.values()


READERS = {"uniprot_tsv": read_uniprot_tsv, "ptm_mamba_sites": read_ptm_mamba_sites}


def check_output_path(csv_path: str | os.PathLike) -> None:
    """Refuse to write over a CSV that the prepare stage did not make (e.g. datasets/demo.csv)."""
    summary = prepared_summary_path(csv_path)
    if Path(csv_path).exists() and not summary.exists():
        raise PipelineError(f"{csv_path} exists and was not made by the prepare stage (no {summary.name} "
                            "beside it); with dataset.source set, dataset.dataset_location names the CSV it writes: "
                            "choose another path")


def prepare(fmt: str, source: str | os.PathLike, output: str | os.PathLike) -> dict:
    """Build ``output`` (CSV) and its summary from ``source``; return the summary."""
    if fmt not in READERS:
        raise PipelineError(f"unknown source format {fmt!r} (known: {', '.join(FORMATS)})")
    source, output = Path(source), Path(output)
    check_output_path(output)
    tally = Tally()
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for entry in READERS[fmt](source):
        tally.entries += 1
        tally.features += len(entry.sites)
        if entry.id in seen:  # (ids derived from the sequence cannot repeat: rows are grouped by sequence)
            tally.skipped_entries[REPEATED] += 1
            tally.skipped_features[REPEATED] += len(entry.sites)
            continue
        tokens = ptm_tokens(entry, tally)
        if tokens is not None:
            ptm_seq = "".join(tokens)
            uid = entry.id or derived_id(ptm_seq)
            seen.add(uid)
            rows.append((uid, ptm_seq))
    if not rows:
        raise PipelineError(f"{source}: no entry with a PTM of the vocabulary ({tally.entries} entries, "
                            f"{tally.features} features read); is it a {fmt} file?")
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n").writerows([(ID_COLUMN, SEQUENCE_COLUMN), *rows])
    summary = {
        "settings": {"dataset.source": source_identity({"format": fmt, "path": source})},
        "source": str(source),
        "entries_read": tally.entries,
        "proteins_written": len(rows),
        "ptm_sites_written": sum(tally.kept.values()),
        "features_read": tally.features,
        "features_skipped": dict(tally.skipped_features.most_common()),
        "entries_skipped": dict(tally.skipped_entries.most_common()),
        "not_in_vocabulary": dict(tally.not_in_vocabulary.most_common(50)),
        "sites_per_token": dict(tally.kept.most_common()),
        "files": {output.name: sha256_of(buf.getvalue().encode())},
    }
    write_together({output: buf.getvalue(), prepared_summary_path(output): json.dumps(summary, indent=2) + "\n"})
    return summary


def check_prepared(settings: Settings) -> None:
    """With ``dataset.source`` set, refuse a CSV at ``dataset.dataset_location`` that was not prepared
    from that source (one line); without a source, nothing to check."""
    if settings.dataset.source is None:
        return
    csv_path, fix = Path(settings.dataset.dataset_location), "rerun the prepare stage (ptm-mamba prepare)"
    where = prepared_summary_path(csv_path)
    try:
        summary = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{where} not found: {csv_path} was not made by the prepare stage; {fix}") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{where}: unreadable ({exc}); {fix}") from None
    check_settings(summary.get("settings") if isinstance(summary, dict) else None, settings, PREPARE, str(where), fix)
    if file_sha256(csv_path) != summary.get("files", {}).get(csv_path.name):
        raise PipelineError(f"{csv_path} is not the file {where.name} records (edited after it was prepared); {fix}")


def report_lines(summary: dict) -> list[str]:
    """What the prepare command prints."""
    lines = [f"{summary['entries_read']} entries, {summary['features_read']} features read; "
             f"{summary['proteins_written']} proteins with {summary['ptm_sites_written']} PTM sites written"]
    lines += [f"skipped feature ({reason}): {n}" for reason, n in summary["features_skipped"].items()]
    lines += [f"skipped entry ({reason}): {n}" for reason, n in summary["entries_skipped"].items()]
    if summary["not_in_vocabulary"]:
        top = list(summary["not_in_vocabulary"].items())[:5]
        lines.append("most frequent descriptions not in the vocabulary: " + ", ".join(f"{t} x{n}" for t, n in top))
    return lines
