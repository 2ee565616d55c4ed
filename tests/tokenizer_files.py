"""Small tokenizer files with the Gemma 4 special ids, built from the package's own text."""

from __future__ import annotations

import string
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dgemma_jax.tokenizer import gemma4_pieces, train_sentencepiece

TURN_PIECES = ("<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<bos>", "<eos>", "<mask>",
               "<|tool>", "<tool|>", "<|tool_response>")


def corpus() -> str:
    return resources.files("dgemma_jax").joinpath("assets", "default_corpus.txt").read_text(encoding="utf-8")


def write_sentencepiece(directory: Path, vocab_size: int = 512) -> Path:
    return train_sentencepiece([corpus()], directory / "tokenizer.model", vocab_size)


def write_tokenizer_json(directory: Path, vocab_size: int = 400) -> Path:
    """A BPE ``tokenizer.json`` (Gemma-like: spaces as ``▁``, specials as added tokens)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Replace("▁", " ")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=gemma4_pieces(),
                                  initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation
                                                        + "\n▁"), show_progress=False)
    tok.train_from_iterator(corpus().splitlines(), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"
