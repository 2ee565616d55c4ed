"""Training data: JSONL -> token rows of fixed shape -> a grain pipeline (shard, shuffle, repeat, batch).

Each line of the JSONL file is one example, either

* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the checkpoint's chat template;
  everything up to the last model turn is the prompt, that turn's content + ``<turn|>`` is the
  response (the only supervised part); or
* ``{"prompt": "...", "completion": "..."}``: prompt = BOS + prompt, response = completion + EOS.
  ``completion`` may also be a list of segments ``{"text": "...", "train": false}`` (``train``
  defaults to true): a segment with ``train: false`` is held clean in the canvas and not supervised,
  i.e. it is context the model sees at its place in the canvas, as ``clamp_ids`` give it at
  generation time (infilling, or Sudoku givens).

A row is ``prompt | response canvases | padding`` (see :mod:`dgemma_jax.training.objective`):
``tokens`` [S = max_prompt_len + C*L], ``prompt_len`` [], ``loss_mask`` [C*L]. The response is padded
with the pad id up to the end of the canvas that holds its EOS; those pad positions are supervised
too (``supervise_padding``), so the model learns a confident, stable tail after EOS.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import grain
import numpy as np

from dgemma_jax.chat import ChatTemplate
from dgemma_jax.tokenizer import Tokenizer

ASSISTANT_ROLES = ("assistant", "model")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``overlong``: "truncate" (prompt keeps BOS + its last tokens; a response keeps its first
    C*L tokens and then has no EOS) or "drop". ``skip_malformed``: count and skip bad lines instead
    of raising."""

    path: str
    max_prompt_len: int
    num_canvases: int = 1
    overlong: str = "truncate"
    skip_malformed: bool = False
    supervise_padding: bool = True

    def __post_init__(self):
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong={self.overlong!r}: expected 'truncate' or 'drop'")
        if self.max_prompt_len < 1 or self.num_canvases < 1:
            raise ValueError("data.max_prompt_len and data.num_canvases must be >= 1")


@dataclasses.dataclass
class DataStats:
    examples: int = 0
    malformed: int = 0
    truncated: int = 0
    dropped: int = 0
    first_malformed: str = ""  # file:line: reason of the first skipped line


class MalformedLine(ValueError):
    """A JSONL line that is not a usable example; the message names the file and line."""


def _completion(completion: Any, tokenizer: Tokenizer, eos_id: int) -> tuple[list[int], np.ndarray]:
    """A completion string or segment list -> (response ids incl. EOS, trained [len] bool)."""
    if isinstance(completion, str):
        completion = [dict(text=completion)]
    if not isinstance(completion, list) or not completion:
        raise ValueError("'completion' must be a string or a non-empty list of {'text', 'train'} segments")
    ids, trained = [], []
    for k, segment in enumerate(completion):
        if not isinstance(segment, dict) or not isinstance(segment.get("text"), str) \
                or not isinstance(segment.get("train", True), bool) or set(segment) - {"text", "train"}:
            raise ValueError(f"completion segment {k}: expected {{'text': str, 'train': bool}}, found {segment!r}")
        piece = tokenizer.encode(segment["text"])
        ids += piece
        trained += [segment.get("train", True)] * len(piece)
    return ids + [eos_id], np.asarray(trained + [True], bool)


def _split(record: Any, tokenizer: Tokenizer, template: ChatTemplate | None, eos_id: int):
    """One parsed JSON record -> (prompt ids, response ids incl. EOS, trained [len(response)] bool
    or None when all of it is). ValueError when unusable."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("every message needs string 'role' and 'content'")
        if messages[-1]["role"] not in ASSISTANT_ROLES:
            raise ValueError(f"the last message must be the model's turn (role {' or '.join(ASSISTANT_ROLES)})")
        if template is None:
            raise ValueError("chat 'messages' need a chat template (none was found next to the tokenizer)")
        prompt = tokenizer.encode(template.render(messages[:-1], add_generation_prompt=True))
        end_of_turn = tokenizer.token_to_id("<turn|>")
        if end_of_turn is None:
            raise ValueError("the tokenizer has no '<turn|>' token to end the model's turn")
        return prompt, tokenizer.encode(messages[-1]["content"]) + [end_of_turn], None
    if "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError("'prompt' must be a string")
        return [tokenizer.bos_id] + tokenizer.encode(record["prompt"]), *_completion(record["completion"], tokenizer, eos_id)
    raise ValueError("expected 'messages', or 'prompt' and 'completion'")


def make_row(prompt: list[int], response: list[int], cfg: DataConfig, canvas_length: int, pad_id: int,
             stats: DataStats, trained: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """Lays one example out as fixed-shape arrays; None when it is dropped as over-long.
    ``trained`` [len(response)] bool: which response tokens are supervised (default all)."""
    n = cfg.num_canvases * canvas_length
    too_long = len(prompt) > cfg.max_prompt_len or len(response) > n
    if too_long:
        if cfg.overlong == "drop":
            stats.dropped += 1
            return None
        stats.truncated += 1
        if len(prompt) > cfg.max_prompt_len:
            prompt = prompt[:1] + prompt[len(prompt) - cfg.max_prompt_len + 1:]
        response = response[:n]
    used = -(-len(response) // canvas_length) * canvas_length  # up to the end of the last canvas used
    mask = np.zeros(n, np.float32)
    mask[: used if cfg.supervise_padding else len(response)] = 1.0
    if trained is not None:
        mask[: len(response)] *= trained[: len(response)]
    tokens = np.full(cfg.max_prompt_len + n, pad_id, np.int32)
    tokens[: len(prompt)] = prompt
    tokens[len(prompt): len(prompt) + len(response)] = response
    return dict(tokens=tokens, prompt_len=np.int32(len(prompt)), loss_mask=mask)


def load_rows(cfg: DataConfig, tokenizer: Tokenizer, template: ChatTemplate | None, canvas_length: int,
              pad_id: int, eos_id: int) -> tuple[list[dict[str, np.ndarray]], DataStats]:
    """Reads and tokenises the whole JSONL file. Raises :class:`MalformedLine` (file:line) unless
    ``skip_malformed``; FileNotFoundError / ValueError naming the file when it is missing or empty."""
    path = Path(cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training data file not found")
    rows, stats = [], DataStats()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                prompt, response, trained = _split(json.loads(line), tokenizer, template, eos_id)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if not cfg.skip_malformed:
                    raise MalformedLine(f"{path}:{number}: {e}") from None
                stats.malformed += 1
                stats.first_malformed = stats.first_malformed or f"{path}:{number}: {e}"
                continue
            row = make_row(prompt, response, cfg, canvas_length, pad_id, stats, trained)
            if row is not None:
                rows.append(row)
    stats.examples = len(rows)
    if not rows:
        raise ValueError(f"{path}: no usable examples ({stats})")
    return rows, stats


def pipeline(rows: list[dict[str, np.ndarray]], batch_size: int, seed: int, process_index: int = 0,
             process_count: int = 1) -> grain.MapDataset:
    """This process's share of ``rows``, shuffled with ``seed`` anew every epoch, repeated forever,
    in batches of ``batch_size`` (per process). ``iter()`` of it has ``get_state``/``set_state``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    ds = grain.MapDataset.source(rows)[process_index::process_count]
    if len(ds) < batch_size:
        raise ValueError(f"{len(ds)} examples on this process, fewer than one batch of {batch_size}")
    return ds.shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)
