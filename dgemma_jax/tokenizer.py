"""A checkpoint's tokenizer: SentencePiece ``tokenizer.model`` or ``tokenizers`` ``tokenizer.json``.

``Tokenizer.load(directory)`` prefers ``tokenizer.model`` (SentencePiece) and falls back to
``tokenizer.json`` (Hugging Face ``tokenizers``). Special-token ids are read from the files. Special
tokens written in the text (``<bos>``, ``<|turn>``, ``<|think|>``, ...) encode to their single ids
with either back end, so a rendered chat template can be encoded as it is.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_model

SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

# The special tokens of a Gemma 4 vocabulary below id 107 (pad, eos, bos, unk come first).
GEMMA4_SPECIALS: dict[int, str] = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 50: "<|tool_response>",
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>",
}
_MARKER = re.compile(r"<[^<>\s]+>")  # what a special token looks like: <bos>, <|turn>, <unused3>


class Tokenizer:
    """Text <-> token ids. Build it with :meth:`load`.

    Attributes: ``bos_id``, ``eos_id``, ``pad_id`` (ints), ``unk_id`` (int or None), ``vocab_size``
    (number of ids the tokenizer defines), ``path`` (the file it was read from).
    """

    def __init__(self, path: Path, vocab_size: int, bos_id: int, eos_id: int, pad_id: int,
                 unk_id: int | None, special_ids: Iterable[int]):
        self.path = path
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self._special_ids = frozenset(special_ids) | {bos_id, eos_id, pad_id} | ({unk_id} - {None})

    @staticmethod
    def load(directory: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a snapshot directory: ``tokenizer.model`` if present, else ``tokenizer.json``.

        Raises FileNotFoundError when neither exists, ValueError (naming the file) when it cannot be read.
        """
        directory = Path(directory)
        if (directory / SP_FILE).is_file():
            return _SentencePieceTokenizer(directory / SP_FILE)
        if (directory / HF_FILE).is_file():
            return _HFTokenizer(directory / HF_FILE)
        raise FileNotFoundError(f"{directory}: no tokenizer found (expected {SP_FILE} or {HF_FILE})")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in it become their single ids."""
        ids = self._encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. ``skip_special_tokens`` drops pad/bos/eos/unk and the other special tokens."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._decode(ids)

    def token_to_id(self, piece: str) -> int | None:
        """The id of the vocabulary entry ``piece``, or None if there is none."""
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id``; IndexError when out of range."""
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return token_id


class _SentencePieceTokenizer(Tokenizer):
    """SentencePiece back end. Control pieces (bos, eos, pad) and unk are matched in the text here
    (SentencePiece itself only matches user-defined symbols); special = control, unknown, and
    user-defined symbols that look like ``<...>`` markers."""

    def __init__(self, path: Path):
        data = path.read_bytes()
        proto = sp_model.ModelProto()
        try:
            proto.ParseFromString(data)
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # protobuf DecodeError, RuntimeError from SentencePiece
            raise ValueError(f"{path}: not a valid SentencePiece model ({type(e).__name__}: {e})") from e
        types = sp_model.ModelProto.SentencePiece
        self._verbatim = {}  # id -> piece for pieces SentencePiece does not write or match in text
        special = []
        for i, p in enumerate(proto.pieces):
            if p.type in (types.CONTROL, types.UNKNOWN):
                self._verbatim[i] = p.piece
                special.append(i)
            elif p.type == types.USER_DEFINED and _MARKER.fullmatch(p.piece):
                special.append(i)
        ids = {name: getattr(self._sp, f"{name}_id")() for name in ("bos", "eos", "pad", "unk")}
        for name in ("bos", "eos", "pad"):
            if ids[name] < 0:
                raise ValueError(f"{path}: the model defines no {name} token")
        by_piece = sorted(self._verbatim.values(), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, by_piece)) + ")") if by_piece else None
        self._piece_ids = {p: i for i, p in self._verbatim.items()}
        super().__init__(path, self._sp.get_piece_size(), ids["bos"], ids["eos"], ids["pad"],
                         ids["unk"] if ids["unk"] >= 0 else None, special)

    def token_to_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)  # unknown pieces map to unk: check the round trip
        return i if self._sp.id_to_piece(i) == piece else None

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(self._check_id(token_id))

    def _encode(self, text: str) -> list[int]:
        parts = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):  # odd positions are the matched control pieces
            if k % 2:
                ids.append(self._piece_ids[part])
            elif part:
                ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def _decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            self._check_id(i)
            if i in self._verbatim:
                out += [self._sp.decode(run), self._verbatim[i]]
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)


class _HFTokenizer(Tokenizer):
    """``tokenizers`` back end. Special-token names come from ``tokenizer_config.json`` or
    ``special_tokens_map.json`` next to the file (Gemma's names otherwise); special = added tokens
    marked special."""

    def __init__(self, path: Path):
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        names = _special_token_names(path.parent)
        ids = {name: self._tok.token_to_id(token) for name, token in names.items()}
        for name in ("bos", "eos", "pad"):
            if ids[name] is None:
                raise ValueError(f"{path}: no {name} token {names[name]!r} in the vocabulary")
        special = [i for i, t in self._tok.get_added_tokens_decoder().items() if t.special]
        super().__init__(path, self._tok.get_vocab_size(with_added_tokens=True), ids["bos"], ids["eos"],
                         ids["pad"], ids["unk"], special)

    def token_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(self._check_id(token_id))

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        for i in ids:
            self._check_id(i)
        return self._tok.decode(ids, skip_special_tokens=False)


def _special_token_names(directory: Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings from the HF side files, else Gemma's names."""
    names = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        try:
            data = json.loads((directory / file).read_text())
        except FileNotFoundError:
            continue
        except ValueError as e:
            raise ValueError(f"{directory / file}: not valid JSON ({e})") from e
        for name in names:
            value = data.get(f"{name}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[name] = value
    return names


def train_sentencepiece(texts: Iterable[str], out_path: str | os.PathLike, vocab_size: int,
                        extra_symbols: Sequence[str] = ()) -> Path:
    """Trains a small BPE SentencePiece model whose special tokens sit at the Gemma 4 ids.

    pad 0, eos 1, bos 2, unk 3, then ``<mask>``, the turn/think/channel/tool markers at their ids
    (:data:`GEMMA4_SPECIALS`) with ``<unused{k}>`` in between; byte fallback, no normalisation, so
    decode(encode(text)) == text. ``extra_symbols``: more always-whole pieces, at the ids right
    after the Gemma 4 specials in the given order. Deterministic (one thread). Writes ``out_path``
    atomically.
    """
    out_path = Path(out_path)
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("train_sentencepiece: no text to train on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
            unk_piece="<unk>", user_defined_symbols=gemma4_pieces()[4:] + list(extra_symbols), byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        )
    except RuntimeError as e:  # e.g. vocab_size too small for the specials, 256 bytes and the characters
        raise ValueError(f"{out_path}: SentencePiece training failed: {e}") from e
    _check_gemma4_ids(spm.SentencePieceProcessor(model_proto=model.getvalue()), out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:  # created with the usual (umask) permissions, unlike mkstemp
            f.write(model.getvalue())
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def gemma4_pieces() -> list[str]:
    """Pieces for ids 0 .. 106 of a Gemma 4 vocabulary: :data:`GEMMA4_SPECIALS`, ``<unused{k}>`` between."""
    pieces, unused = [], 0
    for i in range(max(GEMMA4_SPECIALS) + 1):
        if i in GEMMA4_SPECIALS:
            pieces.append(GEMMA4_SPECIALS[i])
        else:
            pieces.append(f"<unused{unused}>")
            unused += 1
    return pieces


def _check_gemma4_ids(sp: spm.SentencePieceProcessor, out_path: Path) -> None:
    size = sp.get_piece_size()
    wrong = [f"{i}: {sp.id_to_piece(i) if i < size else None!r} (expected {p!r})"
             for i, p in enumerate(gemma4_pieces()) if i >= size or sp.id_to_piece(i) != p]
    if wrong:
        raise ValueError(f"{out_path}: trained model has special tokens at the wrong ids: {'; '.join(wrong)}")
