from ptm_mamba.tokenizer import PTM_RESIDUE, PTM_TOKENS, VOCAB, PTMTokenizer, TokenizeError

import pytest


def test_vocabulary_matches_published_order():
    tok = PTMTokenizer()
    assert len(tok) == 59
    # ids the released PTM-Mamba checkpoint was trained with
    assert [tok.token_to_id[t] for t in ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>", "L", "A", "PTM")] == \
        [0, 1, 2, 3, 7, 8, 9, 33]
    assert tok.token_to_id["<N-linked (GlcNAc...) asparagine>"] == 34
    assert tok.token_to_id["<Phosphoserine>"] == 36
    assert tok.token_to_id["<N6-acetyllysine>"] == 40
    assert tok.token_to_id["<4-carboxyglutamate>"] == 58
    assert set(PTM_RESIDUE) == set(PTM_TOKENS)
    assert len(set(VOCAB)) == len(VOCAB)


def test_round_trip_and_ptm_flags():
    tok = PTMTokenizer()
    seq = "M<N-acetylalanine>K<Phosphoserine>N<N-linked (GlcNAc...) asparagine>PTM"
    ids = tok.encode(seq)
    assert tok.decode(ids) == seq
    assert len(ids) == 9  # a PTM token is one token; "PTM" here is Pro-Thr-Met
    assert [tok.is_ptm(i) for i in ids] == [False, True, False, True, False, True, False, False, False]
    assert tok.encode(seq, add_special_tokens=True)[0] == tok.cls_id
    assert tok.encode(seq, add_special_tokens=True)[-1] == tok.eos_id


def test_residue_sequence_maps_ptms_to_their_residue():
    tok = PTMTokenizer()
    tokens = tok.split("M<N-acetylalanine>K<Phosphoserine><Phosphotyrosine>")
    assert tok.residue_sequence(tokens) == "MAKSY"


def test_errors_name_the_position():
    tok = PTMTokenizer()
    with pytest.raises(TokenizeError) as err:
        tok.split("MKj")
    assert err.value.position == 2
    with pytest.raises(TokenizeError):
        tok.split("MK<Phosphoserine")
    with pytest.raises(TokenizeError):
        tok.split("MK<Foo>")
    assert tok.split("MK<Foo>", unknown_ptm="unk") == ["M", "K", "<unk>"]


def test_position_classes_agree_on_ints_numpy_and_torch():
    import numpy as np
    import torch

    from ptm_mamba.tokenizer import esm_hidden, in_sequence, is_ptm, is_residue, is_target, is_unknown_ptm, token_ids

    tok = PTMTokenizer()
    tokens = ["<cls>", "M", "<Phosphoserine>", "<unk>", "K", "<eos>", "<pad>", "<mask>"]
    expected = {  # per token above
        is_residue: [0, 1, 0, 0, 1, 0, 0, 0],
        is_ptm: [0, 0, 1, 0, 0, 0, 0, 0],
        is_unknown_ptm: [0, 0, 0, 1, 0, 0, 0, 0],
        in_sequence: [0, 1, 1, 1, 1, 0, 0, 0],
        is_target: [0, 1, 1, 0, 1, 0, 0, 0],
        esm_hidden: [0, 0, 1, 1, 0, 0, 0, 0],
    }
    ids = token_ids(tokens)
    assert ids.tolist() == [tok.token_to_id[t] for t in tokens]
    for fn, want in expected.items():
        want = [bool(w) for w in want]
        assert fn(ids).tolist() == want, fn.__name__
        assert fn(torch.from_numpy(ids)).tolist() == want, fn.__name__
        assert [bool(fn(int(i))) for i in ids] == want, fn.__name__
    # every vocabulary id is exactly one of: residue, known PTM, <unk>, or outside the protein
    every = np.arange(len(tok))
    classes = np.stack([is_residue(every), is_ptm(every), is_unknown_ptm(every), ~in_sequence(every)])
    assert (classes.sum(0) == 1).all()
    assert tok.split("MK<Foo>", unknown_ptm="unk")[2] == "<unk>" and not tok.is_ptm(tok.unk_id)
