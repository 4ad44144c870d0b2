"""CrystalTokenizer and train_tokenizer on a real SentencePiece model trained on stdlib text."""

import json
import pickle
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from megacrystal.data.errors import DataError
from megacrystal.data.tokenizer import SPECIAL_TOKENS, CrystalTokenizer, pad_to_multiple, train_tokenizer

VOCAB = 512


def stdlib_text(n_files: int = 30) -> str:
    """Real text from the running interpreter's stdlib (the same source the embedded corpus uses)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.glob("*.py"))[:n_files])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    (d / "train.txt").write_text(stdlib_text())
    return train_tokenizer([d / "train.txt"], d / "tok", VOCAB)


@pytest.fixture(scope="module")
def tok(model_path) -> CrystalTokenizer:
    return CrystalTokenizer.load(model_path)


def test_special_tokens_follow_base_vocab_in_spec_order(tok):
    assert tok.base_vocab_size == VOCAB
    assert len(SPECIAL_TOKENS) == 18
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(VOCAB, VOCAB + 18))
    assert tok.special_ids["<fim_prefix>"] == VOCAB and tok.special_ids["<fim_middle>"] == VOCAB + 1
    assert tok.special_ids["<fim_suffix>"] == VOCAB + 2 and tok.special_ids["<fim_pad>"] == VOCAB + 3
    assert tok.special_ids["<reponame>"] == VOCAB + 17
    assert tok.fim_ids == {"prefix": VOCAB, "middle": VOCAB + 1, "suffix": VOCAB + 2, "pad": VOCAB + 3}


def test_crystal_numbers_for_a_32000_base():
    # The spec's ids (32000..32017) and 32032 rows follow from the same rules for a LLaMA-sized base.
    assert pad_to_multiple(32000 + 18, 32) == 32032
    assert pad_to_multiple(32032, 32) == 32032
    with pytest.raises(DataError):
        pad_to_multiple(10, 0)


def test_encode_never_produces_special_ids_and_decode_maps_them_back(tok):
    ids = tok.encode("<fim_prefix>def f(): pass<fim_suffix>")
    assert all(i < tok.base_vocab_size for i in ids)
    assert tok.decode(ids) == "<fim_prefix>def f(): pass<fim_suffix>"
    mixed = [tok.fim_ids["prefix"], *tok.encode("x = 1"), tok.fim_ids["middle"]]
    assert tok.decode(mixed) == "<fim_prefix>x = 1<fim_middle>"
    assert tok.id_to_token(VOCAB + 4) == "<filename>"


def test_round_trip_on_real_code(tok):
    text = stdlib_text(40)[-20000:]
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    # identity normalization + byte fallback make the tokenizer lossless, which code data relies on, except for
    # U+2581: sentencepiece writes spaces as that character, so one in the text reads back as a space.
    assert tok.decode(tok.encode(text)) == text.replace("\u2581", " ")


def test_the_space_marker_character_encodes_as_a_space(tok):
    """sentencepiece's (and LLaMA's) known loss: U+2581 in a text gets a space's ids."""
    assert tok.encode("a\u2581b") == tok.encode("a b")


def test_padded_vocab(model_path):
    assert CrystalTokenizer.load(model_path).vocab_size == pad_to_multiple(VOCAB + 18, 32)
    assert CrystalTokenizer.load(model_path, VOCAB + 18).vocab_size == VOCAB + 18
    with pytest.raises(DataError, match="smaller than 530"):
        CrystalTokenizer.load(model_path, VOCAB + 17)


def test_decode_padding_rows_and_out_of_range(tok):
    assert tok.decode([tok.vocab_size - 1]) == ""  # an unused embedding row decodes to nothing
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_eos_bos_and_megatron_interface(tok):
    assert (tok.eos_id, tok.bos_id) == (2, 1)  # LLaMA's layout, which Crystal's data used (eos_id 2)
    assert tok.eod == tok.eos == 2 and tok.bos == 1
    assert tok.vocab_size == tok.padded_vocab_size
    assert tok.pad == tok.fim_ids["pad"]
    json.dumps(tok.unique_identifiers)  # megatron serialises it into its cache key


def test_fingerprint_tracks_model_size_and_eos(model_path, tok):
    again = CrystalTokenizer.load(model_path)
    assert again.fingerprint() == tok.fingerprint()
    assert CrystalTokenizer.load(model_path, tok.vocab_size + 32).fingerprint() != tok.fingerprint()
    assert CrystalTokenizer.load(model_path, eos_id=0).fingerprint() != tok.fingerprint()


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint() == tok.fingerprint()
    assert clone.encode("import os") == tok.encode("import os")


def test_training_is_deterministic_and_reads_jsonl(tmp_path, model_path):
    lines = stdlib_text().split("\n\n")
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in lines))
    a = train_tokenizer([jsonl], tmp_path / "a", VOCAB, text_field="body")
    b = train_tokenizer([jsonl], tmp_path / "sub" / "b", VOCAB, text_field="body")
    assert a.read_bytes() == b.read_bytes()
    # The same lines give the same model whether they came as .txt or as .jsonl.
    assert a.read_bytes() == model_path.read_bytes()


def test_load_and_train_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        CrystalTokenizer.load(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        CrystalTokenizer.load(tmp_path / "bad.model")
    with pytest.raises(DataError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "t", VOCAB)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer([tmp_path / "bad.model"], tmp_path / "t", 100)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello world"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"^\S*bad\.jsonl:2: no string field 'text'"):
        train_tokenizer([bad], tmp_path / "t", 300)
    (tmp_path / "tiny.txt").write_text("ab\n")
    with pytest.raises(DataError, match="smaller vocab_size"):
        train_tokenizer([tmp_path / "tiny.txt"], tmp_path / "t", 5000)


@pytest.mark.parametrize("padded", [None, 70_000])  # uint16 and int32 token files
def test_encode_documents_equals_encode_plus_eos(tok, padded):
    from megacrystal.data.indexed import token_dtype

    t = tok if padded is None else CrystalTokenizer.load(tok.source, padded_vocab_size=padded)
    texts = stdlib_text(3).split("\n\n\n") + ["x", "é ünïcode ✓"]
    dtype = token_dtype(t.vocab_size)
    tokens, lengths = t.encode_documents(texts, dtype)
    expected = [i for text in texts for i in t.encode(text) + [t.eos_id]]
    assert tokens.dtype == dtype and tokens.tolist() == expected
    assert lengths.tolist() == [len(t.encode(text)) + 1 for text in texts]
    empty_tokens, empty_lengths = t.encode_documents([], dtype)
    assert empty_tokens.size == 0 and empty_lengths.size == 0


# Pieces that make cuts likely: words, runs of spaces, visible spaces, newlines and multi-byte characters.
_SEGMENT_PIECES = ["a", "bc", "def", "_x1", " ", "  ", "    ", "\u2581", "\n", "\t", "é", "日本", "🙂", "\x00", "()"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_SEGMENT_PIECES), max_size=120).map("".join), min_size=1, max_size=4),
       st.integers(1, 24), st.booleans())
def test_documents_encoded_in_segments_get_the_ids_of_the_whole_text(tok, texts, segment, as_bytes):
    from megacrystal.data.indexed import token_dtype

    assert tok.segmented
    docs = [t.encode("utf-8") for t in texts] if as_bytes else texts
    tokens, lengths = tok.encode_documents(docs, token_dtype(tok.vocab_size), segment)
    assert tokens.tolist() == [i for text in texts for i in tok.encode(text) + [tok.eos_id]]
    assert lengths.tolist() == [len(tok.encode(text)) + 1 for text in texts]


def test_segments_on_real_code_with_the_default_size(tok):
    from megacrystal.data.indexed import token_dtype
    from megacrystal.data.tokenizer import SEGMENT_BYTES

    texts = [t for t in stdlib_text(20).split("\n\n\n") if len(t) > 4 * SEGMENT_BYTES]
    assert len(texts) > 5
    tokens, _ = tok.encode_documents(texts, token_dtype(tok.vocab_size))
    assert tokens.tolist() == [i for text in texts for i in tok.encode(text) + [tok.eos_id]]


def _with_piece(model_path: Path, piece: str) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto.FromString(model_path.read_bytes())
    model.pieces.add(piece=piece, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return model.SerializeToString()


def test_a_piece_that_spans_a_cut_turns_segments_off(model_path):
    from megacrystal.data.indexed import token_dtype

    t = CrystalTokenizer(_with_piece(model_path, "x\u2581y"))
    text = "x y " * 200
    whole = t.encode(text)
    assert whole.count(t.base_vocab_size - 1) == 200  # cutting before any " y" would split that piece
    assert not t.segmented
    tokens, _ = t.encode_documents([text], token_dtype(t.vocab_size), segment=4)
    assert tokens.tolist() == whole + [t.eos_id]
    assert CrystalTokenizer(_with_piece(model_path, "\u2581\u2581y")).segmented  # runs of ▁ never get cut


@pytest.mark.parametrize("options", [dict(normalization_rule_name="nmt_nfkc"), dict(model_type="unigram"),
                                     dict(remove_extra_whitespaces=True)])
def test_models_whose_normalizer_or_type_allow_no_cuts_encode_whole_documents(tmp_path, options):
    (tmp_path / "train.txt").write_text(stdlib_text(10))
    t = CrystalTokenizer.load(train_tokenizer([tmp_path / "train.txt"], tmp_path / "t", VOCAB, **options))
    assert not t.segmented
