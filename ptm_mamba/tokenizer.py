"""PTM-Mamba tokenizer: residues and post-translational modifications as tokens.

The vocabulary and its order are those of the published PTM-Mamba model
(programmablebio/ptm-mamba, ``PTMTokenizer``), so token ids here match the
released checkpoints: special tokens, the 25 residue letters, the ``PTM``
marker, then one token per modification, written ``<Name>`` in sequences,
e.g. ``M<N-acetylalanine>K<Phosphoserine>``.

A ``<...>`` run is one PTM token and any other character one residue, in pure
Python. On sequences of residue letters and PTM tokens this is what the original
reads: its trie (``rust_trie``) walks from each position and takes the *first*
vocabulary entry on its path, the shortest match, not the longest: ``P`` is an
entry, so ``PTM`` in a sequence is Pro-Thr-Met there as here, and the ``PTM``
marker never comes from text. On other text they differ: the original also reads
special tokens (``<mask>``, ``.``, ``-`` ...) from text, and for the ``<`` of an
unknown ``<...>`` it emits ``<unk>`` and reads the rest of the name character by
character (residue letters as residues, others as ``<unk>``); here that is an
error, or one ``<unk>`` with ``unknown_ptm="unk"``.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

SPECIAL_TOKENS = ["<cls>", "<pad>", "<eos>", "<unk>", ".", "-", "<null_1>", "<mask>"]
RESIDUES = list("LAGVSERTIDPKQNFYMHWCXBUZO")
PTM_MARKER = "PTM"
PTM_TOKENS = [
    "<N-linked (GlcNAc...) asparagine>",
    "<Pyrrolidone carboxylic acid>",
    "<Phosphoserine>",
    "<Phosphothreonine>",
    "<N-acetylalanine>",
    "<N-acetylmethionine>",
    "<N6-acetyllysine>",
    "<Phosphotyrosine>",
    "<S-diacylglycerol cysteine>",
    "<N6-(pyridoxal phosphate)lysine>",
    "<N-acetylserine>",
    "<N6-carboxylysine>",
    "<N6-succinyllysine>",
    "<S-palmitoyl cysteine>",
    "<O-(pantetheine 4'-phosphoryl)serine>",
    "<Sulfotyrosine>",
    "<O-linked (GalNAc...) threonine>",
    "<Omega-N-methylarginine>",
    "<N-myristoyl glycine>",
    "<4-hydroxyproline>",
    "<Asymmetric dimethylarginine>",
    "<N5-methylglutamine>",
    "<4-aspartylphosphate>",
    "<S-geranylgeranyl cysteine>",
    "<4-carboxyglutamate>",
]
VOCAB = SPECIAL_TOKENS + RESIDUES + [PTM_MARKER] + PTM_TOKENS
PAD_ID = VOCAB.index("<pad>")
FIRST_RESIDUE_ID = VOCAB.index("L")      # ids below are special tokens
PTM_MARKER_ID = VOCAB.index(PTM_MARKER)  # ids above are PTM tokens

# The residue each modification sits on, so a PTM token counts as one residue
# and ESM-2 (which knows no PTMs) can be given a residue-level sequence.
PTM_RESIDUE = {
    "<N-linked (GlcNAc...) asparagine>": "N",
    "<Pyrrolidone carboxylic acid>": "Q",
    "<Phosphoserine>": "S",
    "<Phosphothreonine>": "T",
    "<N-acetylalanine>": "A",
    "<N-acetylmethionine>": "M",
    "<N6-acetyllysine>": "K",
    "<Phosphotyrosine>": "Y",
    "<S-diacylglycerol cysteine>": "C",
    "<N6-(pyridoxal phosphate)lysine>": "K",
    "<N-acetylserine>": "S",
    "<N6-carboxylysine>": "K",
    "<N6-succinyllysine>": "K",
    "<S-palmitoyl cysteine>": "C",
    "<O-(pantetheine 4'-phosphoryl)serine>": "S",
    "<Sulfotyrosine>": "Y",
    "<O-linked (GalNAc...) threonine>": "T",
    "<Omega-N-methylarginine>": "R",
    "<N-myristoyl glycine>": "G",
    "<4-hydroxyproline>": "P",
    "<Asymmetric dimethylarginine>": "R",
    "<N5-methylglutamine>": "Q",
    "<4-aspartylphosphate>": "D",
    "<S-geranylgeranyl cysteine>": "C",
    "<4-carboxyglutamate>": "E",
}


class TokenizeError(ValueError):
    """A sequence holds text that is neither a residue nor a known PTM token."""

    def __init__(self, message: str, position: int, text: str):
        super().__init__(message)
        self.position = position
        self.text = text


class PTMTokenizer:
    """Tokenizer over :data:`VOCAB`: one token per ``<...>`` run, else per residue letter."""

    def __init__(self):
        self.vocab = list(VOCAB)
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id = self.token_to_id["<pad>"]
        self.mask_id = self.token_to_id["<mask>"]
        self.unk_id = self.token_to_id["<unk>"]
        self.cls_id = self.token_to_id["<cls>"]
        self.eos_id = self.token_to_id["<eos>"]
        self.first_residue_id = self.token_to_id["L"]
        self.ptm_marker_id = self.token_to_id[PTM_MARKER]
        self._residues = frozenset(RESIDUES)
        self._ptm_tokens = frozenset(self.vocab[self.ptm_marker_id + 1:])

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, sequence: str, unknown_ptm: str = "error") -> list[str]:
        """Split a PTM sequence into tokens (strings).

        A ``<...>`` run is one token (no PTM name holds ``<`` or ``>``, so the
        first vocabulary entry that the original's trie finds from ``<`` is the
        whole bracket); any other character must be one of the 25 residue letters. The ``PTM`` marker and the gap/special tokens
        are never produced from text: ``PTM`` in a sequence is Pro-Thr-Met.
        ``unknown_ptm`` decides what happens to a bracketed token not in the
        vocabulary: ``"error"`` raises :class:`TokenizeError`, ``"unk"`` maps
        it to ``<unk>``.
        """
        tokens: list[str] = []
        i, n = 0, len(sequence)
        while i < n:
            ch = sequence[i]
            if ch == "<":
                end = sequence.find(">", i + 1)
                if end == -1:
                    raise TokenizeError(f"unclosed '<' at position {i}", i, sequence[i:i + 20])
                token = sequence[i:end + 1]
                if token not in self._ptm_tokens:
                    if unknown_ptm != "unk":
                        raise TokenizeError(f"unknown PTM token {token!r}", i, token)
                    token = "<unk>"
                tokens.append(token)
                i = end + 1
            elif ch in self._residues:
                tokens.append(ch)
                i += 1
            else:
                raise TokenizeError(f"character {ch!r} is not a residue", i, ch)
        return tokens

    def encode(self, sequence: str, add_special_tokens: bool = False,
               unknown_ptm: str = "error") -> list[int]:
        ids = [self.token_to_id[t] for t in self.split(sequence, unknown_ptm)]
        if add_special_tokens:
            ids = [self.cls_id] + ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def is_ptm(self, token_id: int) -> bool:
        return token_id > self.ptm_marker_id

    def residue_sequence(self, tokens: list[str]) -> str:
        """The unmodified residue sequence (a PTM token becomes its residue)."""
        return "".join(PTM_RESIDUE.get(t, t if len(t) == 1 else "X") for t in tokens)


def unknown_ptm_counts(sequences: Iterable[str], tokenizer: PTMTokenizer) -> Counter:
    """Count bracketed tokens that the vocabulary lacks."""
    counts: Counter = Counter()
    for seq in sequences:
        i = 0
        while True:
            start = seq.find("<", i)
            if start == -1:
                break
            end = seq.find(">", start)
            if end == -1:
                break
            tok = seq[start:end + 1]
            if tok not in tokenizer._ptm_tokens:
                counts[tok] += 1
            i = end + 1
    return counts
