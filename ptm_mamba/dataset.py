"""Read a PTM dataset CSV and refuse bad data with one clear line.

A dataset is a CSV with one protein per row: a sequence column in which modified residues are PTM
tokens, and an id column. Errors name the file, the line and the value.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PipelineError
from .tokenizer import PTMTokenizer, TokenizeError, is_ptm, is_unknown_ptm, token_ids, unknown_ptm_counts

if TYPE_CHECKING:
    from .settings import DatasetSettings

# The columns of every CSV the pipeline writes (the split's, the prepare stage's); also read_dataset's
# defaults, which are the schema's for dataset.id_column_name / sequence_column_name (a test holds them equal).
ID_COLUMN, SEQUENCE_COLUMN = "unique_id", "ptm_seq"


@dataclass(frozen=True)
class Protein:
    id: str
    sequence: str          # the PTM sequence as written in the CSV
    tokens: tuple[str, ...]  # one token per residue (a PTM token is one residue)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def num_ptms(self) -> int:
        """Known modifications; an unknown PTM read as ``<unk>`` is not one (:attr:`num_unknown_ptms`)."""
        return int(is_ptm(token_ids(self.tokens)).sum())

    @property
    def num_unknown_ptms(self) -> int:
        """Unknown PTMs, read as ``<unk>`` under ``dataset.unknown_ptm: unk``."""
        return int(is_unknown_ptm(token_ids(self.tokens)).sum())


def residue_key(protein: Protein, tokenizer: PTMTokenizer = PTMTokenizer()) -> str:
    """What makes two proteins duplicates of each other: their unmodified residue sequence."""
    return tokenizer.residue_sequence(list(protein.tokens))


def derived_id(sequence: str) -> str:
    """A stable id for a protein without one: a hash of its sequence."""
    return "seq-" + hashlib.sha1(sequence.encode("utf-8")).hexdigest()[:16]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise PipelineError(f"dataset file not found: {path}")
    if not path.is_file():
        raise PipelineError(f"dataset path is not a file: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise PipelineError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise PipelineError(f"{path}: the file is empty")
    return text


def read_dataset(path: str | os.PathLike, *, sequence_column: str = SEQUENCE_COLUMN,
                 id_column: str | None = ID_COLUMN, unknown_ptm: str = "error",
                 tokenizer: PTMTokenizer | None = None) -> list[Protein]:
    """Read and validate a dataset CSV; return its proteins in file order.

    With ``id_column=None`` ids derive from the sequence and exact duplicate
    sequences are kept once (as the original PTM-Mamba does); with an id
    column, a repeated id is an error.
    """
    path = Path(path)
    tokenizer = tokenizer or PTMTokenizer()
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise PipelineError(f"{path}: no header line")
    header = [h.strip() for h in header]
    columns = ", ".join(repr(h) for h in header)
    for col, key in ((sequence_column, "sequence_column_name"), (id_column, "id_column_name")):
        if col is not None and col not in header:
            raise PipelineError(
                f"{path}: no column {col!r} (dataset.{key}); the columns are: {columns}")
    seq_idx = header.index(sequence_column)
    id_idx = header.index(id_column) if id_column is not None else None

    rows: list[tuple[int, str, str]] = []  # (line, id, sequence)
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise PipelineError(f"{path} line {line}: {len(row)} fields, the header has {len(header)}")
        seq = row[seq_idx].strip()
        if not seq or seq.lower() in ("nan", "na", "null", "none"):
            raise PipelineError(f"{path} line {line}: empty sequence in column {sequence_column!r}")
        if id_idx is not None:
            pid = row[id_idx].strip()
            if not pid or pid.lower() == "nan":
                raise PipelineError(f"{path} line {line}: empty id in column {id_column!r}")
        else:
            pid = derived_id(seq)
        rows.append((line, pid, seq))
    if not rows:
        raise PipelineError(f"{path}: the file has a header but no rows")

    if unknown_ptm == "error":
        _refuse_unknown_ptms(path, rows, tokenizer)

    proteins: list[Protein] = []
    first_line: dict[str, int] = {}
    for line, pid, seq in rows:
        if pid in first_line:
            if id_column is None:
                continue  # the same sequence again
            raise PipelineError(f"{path} line {line}: duplicate id {pid!r} (first at line {first_line[pid]})")
        first_line[pid] = line
        try:
            tokens = tokenizer.split(seq, unknown_ptm=unknown_ptm)
        except TokenizeError as exc:
            raise PipelineError(f"{path} line {line} (id {pid}): {exc} at position {exc.position + 1}") from None
        proteins.append(Protein(pid, seq, tuple(tokens)))
    return proteins


def _refuse_unknown_ptms(path: Path, rows, tokenizer: PTMTokenizer) -> None:
    counts: Counter = Counter()
    first: dict[str, int] = {}
    for line, _, seq in rows:
        for tok, n in unknown_ptm_counts([seq], tokenizer).items():
            counts[tok] += n
            first.setdefault(tok, line)
    if counts:
        listed = ", ".join(f"{tok} x{n} (first at line {first[tok]})" for tok, n in counts.most_common(10))
        more = f" and {len(counts) - 10} more" if len(counts) > 10 else ""
        raise PipelineError(
            f"{path}: {len(counts)} unknown PTM token(s): {listed}{more}; "
            "set dataset.unknown_ptm: unk to map them to <unk>")


def read_configured(dataset: DatasetSettings) -> list[Protein]:
    """The dataset the ``dataset`` section names, read as it says."""
    return read_dataset(dataset.dataset_location, sequence_column=dataset.sequence_column_name,
                        id_column=dataset.id_column_name, unknown_ptm=dataset.unknown_ptm)
