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
error, or one ``<unk>`` with ``unknown_ptm="unk"``. Brackets that make no token (an unclosed
``<``, ``<a<b>``, ``<>``, a ``>`` alone) are an error in either mode, never ``<unk>``.

What a position is, by token id (:func:`is_residue`, :func:`is_ptm`, :func:`is_unknown_ptm`,
:func:`in_sequence`, :func:`is_target`, :func:`esm_hidden`; each works on an int,
a numpy array or a torch tensor alike, and :func:`token_ids` turns token strings
into ids for them):

==================  =======  ===========  ==========  ==========
token               residue  in_sequence  is_target   esm_hidden
==================  =======  ===========  ==========  ==========
residue letter      yes      yes          yes         no
known PTM           no       yes          yes         yes
``<unk>``           no       yes          no          yes
any other token     no       no           no          no
==================  =======  ===========  ==========  ==========

``<unk>`` comes only from an unknown PTM (``unknown_ptm="unk"``): it is a
modified residue of unknown kind, so it is a position of the protein whose ESM-2
input is ``<mask>`` (ESM-2 knows no modifications), but the loss never scores it
and it is not counted as a PTM site. The ``PTM`` marker never occurs in a sequence.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence, TypeVar

import numpy as np

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
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PAD_ID = TOKEN_ID["<pad>"]
UNK_ID = TOKEN_ID["<unk>"]
FIRST_RESIDUE_ID = TOKEN_ID["L"]      # ids below are special tokens (incl. <unk>)
PTM_MARKER_ID = TOKEN_ID[PTM_MARKER]  # ids from FIRST_RESIDUE_ID up to it are residue letters, above are PTMs

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


# A protein's rows in every per-position array of the pipeline (ESM-2 features, masks, hidden states):
# <cls>, its L residues, <eos>.
ROWS_AROUND_RESIDUES = 2


def rows_of(residues: int) -> int:
    """Rows of a protein of ``residues`` residues: <cls>, the residues, <eos>."""
    return residues + ROWS_AROUND_RESIDUES


def residue_rows(residues: int) -> slice:
    """Where the residues are among a protein's :func:`rows_of` rows (between <cls> and <eos>)."""
    return slice(1, 1 + residues)


# ----------------------------------------------------------------------------- position classes
# Each takes token ids as an int, a numpy array or a torch tensor and returns the same kind of
# bool (comparisons and & / | work alike on all three).
Ids = TypeVar("Ids")


def token_ids(tokens: Sequence[str]) -> np.ndarray:
    """Ids (int64 array) of token strings such as ``Protein.tokens``, for the functions below."""
    return np.array([TOKEN_ID[t] for t in tokens], dtype=np.int64)


def is_residue(ids: Ids) -> Ids:
    """A plain residue letter."""
    return (ids >= FIRST_RESIDUE_ID) & (ids < PTM_MARKER_ID)


def is_ptm(ids: Ids) -> Ids:
    """A known modification (a PTM token of the vocabulary); never ``<unk>``."""
    return ids > PTM_MARKER_ID


def is_unknown_ptm(ids: Ids) -> Ids:
    """``<unk>``: a modification not in the vocabulary, read with ``unknown_ptm="unk"``."""
    return ids == UNK_ID


def in_sequence(ids: Ids) -> Ids:
    """A position of the protein: a residue letter, a known PTM, or ``<unk>`` (an unknown PTM);
    not ``<cls>``/``<eos>``/``<pad>``/``<mask>``."""
    return is_residue(ids) | is_ptm(ids) | is_unknown_ptm(ids)


def is_target(ids: Ids) -> Ids:
    """A position the loss may score: a residue letter or a known PTM (``<unk>`` never is)."""
    return is_residue(ids) | is_ptm(ids)


def esm_hidden(ids: Ids) -> Ids:
    """A position ESM-2 always sees as ``<mask>``: a known PTM or ``<unk>`` (ESM-2 knows no
    modifications); randomly hidden residues come on top (:func:`ptm_mamba.masking.esm_mask`)."""
    return is_ptm(ids) | is_unknown_ptm(ids)


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
        self.token_to_id = dict(TOKEN_ID)
        self.pad_id, self.unk_id = PAD_ID, UNK_ID
        self.mask_id = TOKEN_ID["<mask>"]
        self.cls_id = TOKEN_ID["<cls>"]
        self.eos_id = TOKEN_ID["<eos>"]
        self.first_residue_id, self.ptm_marker_id = FIRST_RESIDUE_ID, PTM_MARKER_ID
        self._residues = frozenset(RESIDUES)
        self._ptm_tokens = frozenset(PTM_TOKENS)

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
        it to ``<unk>``. Brackets that make no token are an error in both modes:
        a ``<`` without a ``>`` before the next ``<`` or the end (``MK<PhosphoserineLLV``,
        ``<a<b>``), an empty ``<>``, a ``>`` without its ``<``.
        """
        tokens: list[str] = []
        i, n = 0, len(sequence)
        while i < n:
            ch = sequence[i]
            if ch == "<":
                end = sequence.find(">", i + 1)
                inner = sequence.find("<", i + 1, None if end == -1 else end)
                if end == -1 or inner != -1:  # never swallow residues up to a later token's '>'
                    after = "the end of the sequence" if end == -1 else "the next '<'"
                    raise TokenizeError(f"unclosed '<' (no '>' before {after}): {sequence[i:i + 20]!r}", i,
                                        sequence[i:i + 20])
                if end == i + 1:
                    raise TokenizeError("empty PTM token '<>'", i, "<>")
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
            elif ch == ">":
                raise TokenizeError("'>' without a '<' before it", i, ch)
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
        """A known modification (see the module's :func:`is_ptm`)."""
        return bool(is_ptm(token_id))

    def residue_sequence(self, tokens: list[str]) -> str:
        """The unmodified residue sequence (a PTM token becomes its residue)."""
        return "".join(PTM_RESIDUE.get(t, t if len(t) == 1 else "X") for t in tokens)


def unknown_ptm_counts(sequences: Iterable[str], tokenizer: PTMTokenizer) -> Counter:
    """Count bracketed tokens that the vocabulary lacks, in each sequence up to its first bracket
    that makes no token (an unclosed ``<``, ``<>``): :meth:`PTMTokenizer.split` refuses that one,
    naming the position."""
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
            if "<" in tok[1:] or tok == "<>":
                break
            if tok not in tokenizer._ptm_tokens:
                counts[tok] += 1
            i = end + 1
    return counts
