"""Generate the SYNTHETIC demo data set: random proteins with motif-rule PTMs.

    python datasets/make_demo.py [--n 2000] [--families 24] [--seed 0] [--out datasets/demo.csv] [--stats]

Not biology: residues are drawn independently from UniProt background
frequencies, a few motifs are planted, then each PTM rule below puts its token
on matching residues with a fixed probability, so a model can learn the rules.
After the ``n`` unrelated proteins come ``families`` homolog families: a founder
and copies of it at the known identities of :data:`FAMILY_IDENTITIES`, so that
a random split puts near-copies of training proteins in the test set and a
split by sequence clusters does not.
The output (columns ``unique_id``, ``ptm_seq``) is byte-identical for the same
arguments: one ``random.Random(seed)`` drives every draw, in a fixed order.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import random
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

from ptm_mamba.errors import PipelineError
from ptm_mamba.tokenizer import PTM_RESIDUE

# Background amino-acid frequencies (%) of UniProtKB/Swiss-Prot, rounded.
AA_FREQ = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.46, "C": 1.38, "Q": 3.93, "E": 6.72,
    "G": 7.07, "H": 2.27, "I": 5.91, "L": 9.65, "K": 5.80, "M": 2.41, "F": 3.86,
    "P": 4.74, "S": 6.64, "T": 5.35, "W": 1.10, "Y": 2.92, "V": 6.86,
}
HYDROPHOBIC = "LIVFAM"

# PTM rules, in priority order (a residue gets at most one PTM: the first rule
# that fires). Each regex matches exactly the modified residue on the plain
# residue sequence; context sits in look-arounds. The initiator Met is kept in
# the sequence (as in UniProt), so "position 2" is index 1.
RULES = [  # (token, regex, probability)
    ("<N-acetylmethionine>", r"\AM(?=[DENQ])", 0.9),         # NatB: Met-[DENQ]
    ("<N-acetylalanine>", r"(?<=\AM)A", 0.8),                 # NatA after Met removal
    ("<N-acetylserine>", r"(?<=\AM)S", 0.8),                  # NatA after Met removal
    ("<N-myristoyl glycine>", r"(?<=\AM)G(?=...[ST])", 0.9),  # NMT: M-G-x-x-x-[ST]
    ("<Pyrrolidone carboxylic acid>",                         # Q after signal peptide
     rf"(?<=\AM[KR][{HYDROPHOBIC}]{{12}}A.A)Q", 0.9),         # M-[KR]-h12-A-x-A|Q
    ("<N-linked (GlcNAc...) asparagine>", r"N(?=[^P][ST])", 0.7),  # sequon N-x-[ST], x!=P
    ("<Phosphoserine>", r"(?<=[RK]..)S|S(?=P)", 0.3),         # PKA-like, proline-directed
    ("<Phosphothreonine>", r"(?<=[RK]..)T|T(?=P)", 0.2),
    ("<Sulfotyrosine>", r"(?<=[DE])Y(?=[DE])", 0.6),          # Y in an acidic patch
    ("<Phosphotyrosine>", r"Y(?=..[IVL])", 0.15),             # Y-x-x-[IVL] (SH2-like)
    ("<N6-acetyllysine>", r"(?<=G)K", 0.25),                  # histone-tail-like G-K
    ("<Omega-N-methylarginine>", r"R(?=GG)", 0.5),            # RGG box
    ("<4-hydroxyproline>", r"(?<=G.)P(?=G)", 0.8),            # collagen G-x-P-G
    ("<S-geranylgeranyl cysteine>", r"C(?=[AILV][AILV]L\Z)", 0.9),  # C-terminal CaaL box
    ("<S-palmitoyl cysteine>",                                # C next to a hydrophobic stretch
     rf"(?<=[{HYDROPHOBIC}]{{4}})C|C(?=[{HYDROPHOBIC}]{{4}})", 0.5),
]

# Motifs planted before the rules run: (where, template, chance per protein, max copies).
# Template letters: a residue; "x" any residue but P; "h" hydrophobic; "[..]" one of.
PLANTS = [
    ("start", "M[DENQ]", 0.12, 1),
    ("start", "M[AS]", 0.15, 1),
    ("start", "MGxxx[ST]", 0.05, 1),
    ("start", "M[KR]" + "h" * 12 + "AxAQ", 0.04, 1),
    ("end", "C[AILV][AILV]L", 0.04, 1),
    ("any", "Nx[ST]", 0.5, 3),
    ("any", "RRx[ST]", 0.4, 2),
    ("any", "[ST]P", 0.3, 2),
    ("any", "EEYDE", 0.04, 1),
    ("any", "YxxL", 0.2, 2),
    ("any", "GKGGKG", 0.08, 1),
    ("any", "RGG" * 4, 0.05, 1),
    ("any", "GxP" * 5 + "G", 0.04, 1),
    ("any", "h" * 16 + "C", 0.05, 1),
]

# Each homolog family: a founder, then one copy per identity here (substitutions only, the initiator
# Met kept, every substituted residue changed to another one: the identity to the founder is exact).
FAMILY_IDENTITIES = (0.9, 0.7, 0.5, 0.4)


class Demo:
    """One seeded generator: every random draw happens here, in a fixed order."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.letters = list(AA_FREQ)  # insertion order: fixed
        self.cum = [sum(list(AA_FREQ.values())[:i + 1]) for i in range(len(AA_FREQ))]

    def residues(self, n: int, allowed: str | None = None) -> str:
        if allowed is None:
            return "".join(self.rng.choices(self.letters, cum_weights=self.cum, k=n))
        return "".join(self.rng.choice(sorted(allowed)) for _ in range(n))

    def fill(self, template: str) -> str:
        """Turn a template such as ``Nx[ST]`` into residues."""
        out = []
        for item in re.findall(r"\[[A-Z]+\]|[A-Zxh]", template):
            if item == "x":
                out.append(self.residues(1, "".join(a for a in AA_FREQ if a != "P")))
            elif item == "h":
                out.append(self.residues(1, HYDROPHOBIC))
            else:
                out.append(self.residues(1, item.strip("[]")))
        return "".join(out)

    def protein(self) -> str:
        """A residue sequence: log-normal length (median 250, 50..1200), motifs planted."""
        length = min(1200, max(50, round(self.rng.lognormvariate(5.52, 0.55))))
        seq = list("M" + self.residues(length - 1))
        for where, template, chance, copies in PLANTS:
            if self.rng.random() >= chance:
                continue
            for _ in range(self.rng.randint(1, copies)):
                motif = self.fill(template)
                start = {"start": 0, "end": length - len(motif)}.get(where)
                if start is None:  # "any": inside, away from both termini
                    start = self.rng.randint(2, length - len(motif) - 5)
                seq[start:start + len(motif)] = motif
        return "".join(seq)

    def mutate(self, seq: str, identity: float) -> str:
        """A copy of ``seq`` with ``round((1 - identity) * len)`` residues (never Met 1) substituted."""
        out = list(seq)
        for i in sorted(self.rng.sample(range(1, len(seq)), round((1 - identity) * len(seq)))):
            while (new := self.residues(1)) == seq[i]:
                pass
            out[i] = new
        return "".join(out)

    def modify(self, seq: str) -> list[str]:
        """Tokens of ``seq`` with PTM tokens placed by :data:`RULES`."""
        tokens = list(seq)
        for token, pattern, p in RULES:
            for m in re.finditer(pattern, seq):
                i = m.start()
                assert seq[i] == PTM_RESIDUE[token], (token, pattern)
                if len(tokens[i]) == 1 and self.rng.random() < p:
                    tokens[i] = token
        return tokens


def generate(n: int, seed: int, families: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` unrelated proteins, then ``families`` homolog families, as rows of (unique_id, tokens)."""
    demo = Demo(seed)
    rows = [demo.modify(demo.protein()) for _ in range(n)]
    for _ in range(families):
        founder = demo.protein()
        rows += [demo.modify(seq) for seq in (founder, *(demo.mutate(founder, x) for x in FAMILY_IDENTITIES))]
    return [(f"DEMO_{i:05d}", tokens) for i, tokens in enumerate(rows, start=1)]


def write_csv(rows: list[tuple[str, list[str]]], out: Path) -> None:
    """Write atomically (temp file in the same folder, then os.replace), ``\\n`` endings."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["unique_id", "ptm_seq"])
            writer.writerows((uid, "".join(tokens)) for uid, tokens in rows)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the data set is a shared file
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def stats(rows: list[tuple[str, list[str]]]) -> str:
    lengths = [len(tokens) for _, tokens in rows]
    sites = Counter(t for _, tokens in rows for t in tokens if len(t) > 1)
    lines = [
        f"sequences: {len(rows)}",
        f"residues: {sum(lengths)} (length min {min(lengths)}, median "
        f"{statistics.median(lengths):g}, max {max(lengths)}, {sum(x > 1024 for x in lengths)} longer than 1024)",
        f"PTM sites: {sum(sites.values())} ({sum(sites.values()) / len(rows):.2f} per protein)",
    ]
    lines += [f"  {sites[token]:6d}  {token}" for token, _, _ in RULES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of proteins")
    parser.add_argument("--families", type=int, default=24,
                        help=f"homolog families after the n proteins ({1 + len(FAMILY_IDENTITIES)} proteins each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("demo.csv"))
    parser.add_argument("--stats", action="store_true", help="print counts after writing")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise PipelineError(f"make_demo: --n must be at least 1, got {args.n}")
    if args.families < 0:
        raise PipelineError(f"make_demo: --families must be at least 0, got {args.families}")
    rows = generate(args.n, args.seed, args.families)
    write_csv(rows, args.out)
    if args.stats:
        print(stats(rows))


if __name__ == "__main__":
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
