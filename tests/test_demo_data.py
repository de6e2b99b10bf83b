"""The bundled synthetic demo data: reproducible, tokenizable, PTMs where the rules put them.

The rule checks here are written independently of the regexes in
``datasets/make_demo.py``: they read the plain residue sequence around each
PTM token.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ptm_mamba.tokenizer import PTM_TOKENS, PTMTokenizer

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
SCRIPT = DATASETS / "make_demo.py"
DEMO = DATASETS / "demo.csv"
STANDARD = set("ACDEFGHIKLMNPQRSTVWY")
FAMILY_IDENTITIES = (0.9, 0.7, 0.5, 0.4)  # as datasets/make_demo.py: founder, then copies at these identities
N_UNRELATED, N_FAMILIES = 2000, 24
N_PROTEINS = N_UNRELATED + N_FAMILIES * (1 + len(FAMILY_IDENTITIES))


def run_script(*args: str, hashseed: str = "0") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, list[str], str]]:
    """(unique_id, tokens, residue sequence) for every row of the committed file."""
    tok = PTMTokenizer()
    with open(DEMO, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        assert next(reader) == ["unique_id", "ptm_seq"]
        out = []
        for uid, seq in reader:
            tokens = tok.split(seq)
            out.append((uid, tokens, tok.residue_sequence(tokens)))
    return out


def test_generator_is_byte_identical_and_matches_committed_file(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for out, hashseed in ((a, "1"), (b, "2")):  # hash randomisation must not matter
        done = run_script("--out", str(out), hashseed=hashseed)
        assert done.returncode == 0, done.stderr
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() == DEMO.read_bytes()
    assert b"\r" not in a.read_bytes()


def test_seed_and_n_change_output(tmp_path):
    outs = {}
    for seed in ("1", "2"):
        outs[seed] = tmp_path / f"s{seed}.csv"
        assert run_script("--n", "20", "--families", "2", "--seed", seed, "--out", str(outs[seed])).returncode == 0
    lines = outs["1"].read_text().splitlines()
    assert len(lines) == 1 + 20 + 2 * (1 + len(FAMILY_IDENTITIES))
    assert lines != outs["2"].read_text().splitlines()
    # the families come after the n proteins and leave them as they are
    assert run_script("--n", "20", "--families", "0", "--seed", "1", "--out", str(tmp_path / "f0.csv")).returncode == 0
    assert (tmp_path / "f0.csv").read_text().splitlines() == lines[:21]


def test_bad_n_is_one_line_error(tmp_path):
    done = run_script("--n", "0", "--out", str(tmp_path / "x.csv"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--n" in done.stderr
    assert not (tmp_path / "x.csv").exists()


def test_rows_tokenize_ids_unique_standard_residues(rows):
    ids = [uid for uid, _, _ in rows]
    assert len(ids) == len(set(ids)) == N_PROTEINS
    assert ids == [f"DEMO_{i:05d}" for i in range(1, N_PROTEINS + 1)]
    for uid, tokens, residues in rows:
        assert set(residues) <= STANDARD, uid
        assert residues[0] == "M", uid  # every demo protein starts with its initiator Met
        assert all(len(t) == 1 or t in PTM_TOKENS for t in tokens), uid


# Where each token may sit: (index i, residue sequence r) -> allowed?
def _at(r: str, i: int) -> str:
    return r[i] if 0 <= i < len(r) else ""


def _hydrophobic(stretch: str) -> bool:
    return len(stretch) == 4 and set(stretch) <= set("LIVFAM")


RULE_CHECKS = {
    "<N-acetylmethionine>": lambda r, i: i == 0 and _at(r, 1) in set("DENQ"),
    "<N-acetylalanine>": lambda r, i: i == 1 and r[0] == "M",
    "<N-acetylserine>": lambda r, i: i == 1 and r[0] == "M",
    "<N-myristoyl glycine>": lambda r, i: i == 1 and r[0] == "M" and _at(r, 5) in set("ST"),
    "<Pyrrolidone carboxylic acid>": lambda r, i: i == 17 and r[14] == "A" and r[16] == "A",
    "<N-linked (GlcNAc...) asparagine>":
        lambda r, i: _at(r, i + 1) not in ("", "P") and _at(r, i + 2) in set("ST"),
    "<Phosphoserine>": lambda r, i: _at(r, i - 3) in set("RK") or _at(r, i + 1) == "P",
    "<Phosphothreonine>": lambda r, i: _at(r, i - 3) in set("RK") or _at(r, i + 1) == "P",
    "<Sulfotyrosine>": lambda r, i: _at(r, i - 1) in set("DE") and _at(r, i + 1) in set("DE"),
    "<Phosphotyrosine>": lambda r, i: _at(r, i + 3) in set("IVL"),
    "<N6-acetyllysine>": lambda r, i: _at(r, i - 1) == "G",
    "<Omega-N-methylarginine>": lambda r, i: r[i + 1:i + 3] == "GG",
    "<4-hydroxyproline>": lambda r, i: _at(r, i - 2) == "G" and _at(r, i + 1) == "G",
    "<S-geranylgeranyl cysteine>": lambda r, i: i == len(r) - 4 and r[-1] == "L",
    "<S-palmitoyl cysteine>": lambda r, i: _hydrophobic(r[max(0, i - 4):i])
                                           or _hydrophobic(r[i + 1:i + 5]),
}


def test_every_ptm_sits_where_its_rule_allows(rows):
    seen = Counter()
    for uid, tokens, residues in rows:
        for i, t in enumerate(tokens):
            if len(t) > 1:
                assert t in RULE_CHECKS, f"{uid}: unexpected token {t}"
                assert RULE_CHECKS[t](residues, i), f"{uid}: {t} at {i} breaks its rule"
                seen[t] += 1
    # every rule fires often enough to be learnable
    assert set(seen) == set(RULE_CHECKS)
    assert min(seen.values()) >= 40, seen


def test_counts_in_a_sane_range(rows):
    lengths = [len(tokens) for _, tokens, _ in rows]
    assert min(lengths) >= 50 and max(lengths) <= 1200
    assert 220 <= sorted(lengths)[len(lengths) // 2] <= 290
    assert sum(x > 1024 for x in lengths) >= 3  # cropping / windowing get exercised
    sites = sum(len(t) > 1 for _, tokens, _ in rows for t in tokens)
    assert 3.0 <= sites / len(rows) <= 6.0
    assert DEMO.stat().st_size < 1_100_000


def test_sequon_glycosylation_rate_matches_rule(rows):
    """About 70% of N-x-[ST] (x != P) sequons carry the N-linked token, so it is learnable."""
    sequons = glycosylated = 0
    for _, tokens, r in rows:
        for i in range(len(r) - 2):
            if r[i] == "N" and r[i + 1] != "P" and r[i + 2] in "ST":
                sequons += 1
                glycosylated += tokens[i] == "<N-linked (GlcNAc...) asparagine>"
    assert sequons > 1000
    assert 0.6 <= glycosylated / sequons <= 0.8


def test_homolog_families_are_copies_at_their_identities(rows):
    """After the 2000 unrelated proteins: 24 families of a founder and 4 copies (substitutions only,
    Met 1 kept) at exactly 90/70/50/40% identity to it, to within one residue."""
    family_rows = rows[N_UNRELATED:]
    size = 1 + len(FAMILY_IDENTITIES)
    assert len(family_rows) == N_FAMILIES * size
    founders = set()
    for start in range(0, len(family_rows), size):
        (_, _, founder), *copies = family_rows[start:start + size]
        founders.add(founder)
        for (uid, _, residues), identity in zip(copies, FAMILY_IDENTITIES):
            assert len(residues) == len(founder) and residues[0] == "M", uid
            same = sum(a == b for a, b in zip(residues, founder)) / len(founder)
            assert abs(same - identity) <= 1 / len(founder), (uid, same, identity)
    assert len(founders) == N_FAMILIES
    assert not founders & {r for _, _, r in rows[:N_UNRELATED]}
