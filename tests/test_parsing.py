"""Text that makes no token or no position is refused in one line, naming where it is:

- brackets in PTM sequences: an unclosed ``<`` (``MK<PhosphoserineLLV``, which under
  ``dataset.unknown_ptm: unk`` used to swallow the residues up to a later token's ``>`` as one
  ``<unk>``), ``<`` inside a token (``<a<b>``), an empty ``<>``, a ``>`` alone; in both unknown_ptm
  modes, named by file, line, id and position;
- positions of ``ptm-mamba prepare`` sources written with other digits than 0-9 (``²``, ``٣``,
  ``３``), which were a traceback (``int("²")``) or silently read (``int("٣") == 3``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import error_line, run_cli, toy_rows, write_config, write_csv
from ptm_mamba.tokenizer import PTMTokenizer, TokenizeError, unknown_ptm_counts

MODES = ("error", "unk")

# sequence -> (0-based position of the refusal, words of the message)
MALFORMED = {
    "MK<PhosphoserineLLV": (2, "unclosed '<' (no '>' before the end of the sequence)"),
    "MK<PhosphoserineLLV<Phosphothreonine>A": (2, "unclosed '<' (no '>' before the next '<')"),
    "MK<a<b>V": (2, "unclosed '<' (no '>' before the next '<')"),
    "M<Phosphoserine>K<": (17, "unclosed '<' (no '>' before the end of the sequence)"),
    "MK<>V": (2, "empty PTM token '<>'"),
    "MKV>A": (3, "'>' without a '<' before it"),
    "M<Phosphoserine>>K": (16, "'>' without a '<' before it"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sequence", MALFORMED)
def test_brackets_that_make_no_token_are_refused_in_both_modes(sequence, mode):
    position, words = MALFORMED[sequence]
    with pytest.raises(TokenizeError) as err:
        PTMTokenizer().split(sequence, unknown_ptm=mode)
    assert err.value.position == position and str(err.value).startswith(words), str(err.value)


def test_well_formed_tokens_still_read():
    tok = PTMTokenizer()
    assert tok.split("MK<Foo>A<Phosphoserine>", unknown_ptm="unk") == ["M", "K", "<unk>", "A", "<Phosphoserine>"]
    assert tok.split("<N-linked (GlcNAc...) asparagine>K") == ["<N-linked (GlcNAc...) asparagine>", "K"]
    # what the error mode lists as unknown stops at a sequence's first bracket that makes no token
    assert unknown_ptm_counts(["M<X>K<a<b>", "MK<Foo>A<Phosphoserine><Bar>", "MK<>A<Y>"], tok) == \
        {"<X>": 1, "<Foo>": 1, "<Bar>": 1}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sequence", ["MK<PhosphoserineLLV", "MK<PhosphoserineLLV<Phosphothreonine>AAS", "MK<a<b>V",
                                      "MK<>V", "MKV>A"])
def test_the_dataset_reader_names_file_line_id_and_position(sequence, mode, tmp_path: Path):
    data = write_csv(tmp_path / "data.csv", toy_rows() + [("BAD1", sequence)])
    config = write_config(tmp_path / "c.yaml", dataset={"dataset_location": str(data), "val_size": 3,
                                                        "test_size": 3, "unknown_ptm": mode})
    out = tmp_path / "out"
    position, words = MALFORMED.get(sequence) or MALFORMED[sequence.replace("AAS", "A")]
    error_line(run_cli("split", "--config", config, "--output_dir", out),
               f"{data} line 22 (id BAD1): {words}", f"at position {position + 1}")
    assert not out.exists()


# ----------------------------------------------------------------------------- prepare: positions

UNIPROT_HEADER = "Entry\tSequence\tModified residue\tGlycosylation\tLipidation\n"
DIGITS = {"superscript": "²", "arabic-indic": "٣", "fullwidth": "３"}


def prepare(fmt: str, source: Path, out: Path):
    return run_cli("prepare", "--format", fmt, "--input", source, "--output", out)


@pytest.mark.parametrize("kind", DIGITS)
def test_a_uniprot_position_with_a_non_ascii_digit_is_one_line(kind, tmp_path: Path):
    digit = DIGITS[kind]
    source, out = tmp_path / "up.tsv", tmp_path / "out" / "data.csv"
    source.write_text(UNIPROT_HEADER
                      + 'P00001\tMASK\tMOD_RES 3; /note="Phosphoserine"\t\t\n'
                      + f'P00002\tMASGK\tMOD_RES 3; /note="Phosphoserine"\t\tLIPID 1{digit}; /note="x"\n')
    error_line(prepare("uniprot_tsv", source, out), f"{source} line 3: entry 'P00002', column 'Lipidation'",
               f"position '1{digit}' holds {digit!r}", "not a digit 0-9")
    assert not out.parent.exists()


@pytest.mark.parametrize("kind", DIGITS)
def test_a_site_table_position_with_a_non_ascii_digit_is_one_line(kind, tmp_path: Path):
    digit = DIGITS[kind]
    source, out = tmp_path / "ptm_labels.csv", tmp_path / "out" / "data.csv"
    source.write_text(f"AC_ID,pos,token\nP1,2,<Phosphoserine>\nP1,{digit},<Phosphoserine>\n".replace(
        "AC_ID,", "AC_ID,ori_seq,").replace("P1,", "P1,MASK,"))
    error_line(prepare("ptm_mamba_sites", source, out), f"{source} line 3: column 'pos'",
               f"position {digit!r} holds {digit!r}", "not a digit 0-9")
    assert not out.parent.exists()


def test_ascii_positions_still_read_and_unreadable_ones_are_still_skipped(tmp_path: Path):
    source = tmp_path / "ptm_labels.csv"
    source.write_text("AC_ID,ori_seq,pos,token\nP1,MASKS,2,<Phosphoserine>\nP1,MASKS,4.0,<Phosphoserine>\n"
                      "P1,MASKS,1_0,<Phosphoserine>\nP1,MASKS,nan,<Phosphoserine>\nP1,MASKS,x,<Phosphoserine>\n")
    result = prepare("ptm_mamba_sites", source, tmp_path / "data.csv")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data.csv").read_text() == "unique_id,ptm_seq\nP1,MA<Phosphoserine>K<Phosphoserine>\n"
    assert "skipped feature (uncertain or unreadable position): 3" in result.stdout
