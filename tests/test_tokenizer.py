"""Tokenizer: SentencePiece and tokenizers back ends, Gemma 4 special ids, errors."""

import json
import shutil

import pytest

from dgemma_jax.tokenizer import GEMMA4_SPECIALS, Tokenizer, gemma4_pieces, train_sentencepiece
from tests.tokenizer_files import TURN_PIECES, corpus, write_sentencepiece, write_tokenizer_json

TEXT = "The harbour town wakes before the sun.\n  Two  spaces, 123 digits; ünïcode ☃ and <b>tags</b>."
CHAT = "<bos><|turn>user\nHello there.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    write_sentencepiece(d)
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    write_tokenizer_json(d)
    return d


@pytest.fixture(scope="module", params=["sp", "hf"])
def tok(request, sp_dir, hf_dir):
    return Tokenizer.load(sp_dir if request.param == "sp" else hf_dir)


def test_special_ids_read_from_files(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    for i, piece in GEMMA4_SPECIALS.items():
        assert tok.token_to_id(piece) == i and tok.id_to_token(i) == piece
    assert tok.token_to_id("<unused0>") == 5
    assert tok.token_to_id("no such piece") is None
    with pytest.raises(IndexError):
        tok.id_to_token(tok.vocab_size)


def test_special_tokens_in_text_are_single_ids(tok):
    for piece in TURN_PIECES:
        assert tok.encode(piece) == [tok.token_to_id(piece)], piece
    enc = tok.encode
    assert enc(CHAT) == ([2, 105] + enc("user\nHello there.") + [106] + enc("\n") + [105] + enc("model\n")
                         + [100] + enc("thought\n") + [101])


def test_encode_decode_round_trip(tok, sp_dir):
    text = TEXT if tok.path.parent == sp_dir else "The harbour town wakes before the sun.\nTwo words."
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(CHAT)) == CHAT
    assert tok.encode("Hello", add_bos=True) == [tok.bos_id, *tok.encode("Hello")]


def test_decode_skip_special_tokens(tok):
    ids = tok.encode(CHAT + "Fine.<turn|>") + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHello there.\nmodel\nthought\nFine."
    assert tok.decode(ids).endswith("Fine.<turn|><eos><pad><pad>")


def test_sentencepiece_training_is_deterministic_and_atomic(sp_dir, tmp_path):
    again = train_sentencepiece([corpus()], tmp_path / "sub" / "tokenizer.model", 512)
    assert again.read_bytes() == (sp_dir / "tokenizer.model").read_bytes()
    assert sorted(p.name for p in again.parent.iterdir()) == ["tokenizer.model"]  # no temp file left
    sp = Tokenizer.load(sp_dir)
    assert sp.vocab_size == 512
    assert [sp.id_to_token(i) for i in range(107)] == gemma4_pieces()
    assert sp.encode("\u2603") and sp.unk_id not in sp.encode("\u2603")  # byte fallback, no <unk>


def test_sentencepiece_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab"):
        train_sentencepiece(["hello world"], tmp_path / "t.model", 200)
    assert not list(tmp_path.iterdir())


def test_both_back_ends_agree_on_specials(sp_dir, hf_dir):
    sp, hf = Tokenizer.load(sp_dir), Tokenizer.load(hf_dir)
    assert type(sp).__name__ != type(hf).__name__
    for piece in gemma4_pieces():
        assert sp.token_to_id(piece) == hf.token_to_id(piece)
    specials = list(range(len(gemma4_pieces())))
    assert sp.decode(specials, skip_special_tokens=True) == hf.decode(specials, skip_special_tokens=True) == ""


def test_sentencepiece_wins_when_both_exist(sp_dir, hf_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    assert Tokenizer.load(tmp_path).path == tmp_path / "tokenizer.model"


def test_hf_special_names_from_tokenizer_config(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<bos>"},
                                                                "eos_token": "<turn|>"}))
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (2, 106)


def test_missing_tokenizer_names_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.load(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.model" in str(e.value) and "tokenizer.json" in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_corrupt_file_names_it(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00\x01 not a tokenizer {")
    with pytest.raises(ValueError, match=name):
        Tokenizer.load(tmp_path)


def test_hf_file_without_bos_is_an_error(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="bos.*<s>"):
        Tokenizer.load(tmp_path)
