"""JSONL -> training rows: chat and prompt/completion records, masks, bad lines, over-long examples,
the grain pipeline and its checkpointable state; config overrides."""

import json

import numpy as np
import pytest

from dgemma_jax.chat import ChatTemplate
from dgemma_jax.config import ConfigError
from dgemma_jax.configs_io import apply_overrides, load_config_file
from dgemma_jax.tokenizer import Tokenizer
from dgemma_jax.training import data
from tests.tokenizer_files import write_sentencepiece

L = 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_sentencepiece(d, 512)
    return Tokenizer.load(d)


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def _load(path, tok, **kw):
    cfg = data.DataConfig(path=str(path), max_prompt_len=kw.pop("max_prompt_len", 40), **kw)
    return data.load_rows(cfg, tok, ChatTemplate.default(), L, 0, tok.eos_id)


def test_chat_record_supervises_only_the_model_turn(tmp_path, tok):
    messages = [dict(role="user", content="Hi"), dict(role="assistant", content="Hello there")]
    rows, stats = _load(_write(tmp_path, [dict(messages=messages)]), tok, num_canvases=2)
    row = rows[0]
    prompt = tok.encode(ChatTemplate.default().render(messages[:1], add_generation_prompt=True))
    response = tok.encode("Hello there") + [tok.token_to_id("<turn|>")]
    p = int(row["prompt_len"])
    assert p == len(prompt) and row["tokens"][:p].tolist() == prompt
    assert row["tokens"][p:p + len(response)].tolist() == response  # ends with <turn|> (an EOS id)
    assert row["tokens"].shape == (40 + 2 * L,)
    used = -(-len(response) // L) * L  # the canvas holding the EOS, padded and supervised to its end
    assert row["loss_mask"].tolist() == [1.0] * used + [0.0] * (2 * L - used)
    assert (row["tokens"][p + len(response):] == 0).all() and stats.examples == 1


def test_prompt_completion_record(tmp_path, tok):
    rows, _ = _load(_write(tmp_path, [dict(prompt="2+2=", completion="4")]), tok, supervise_padding=False)
    row, p = rows[0], int(rows[0]["prompt_len"])
    assert row["tokens"][0] == tok.bos_id
    assert row["tokens"][p:p + 2].tolist() == tok.encode("4") + [tok.eos_id]
    assert row["loss_mask"].tolist() == [1.0, 1.0] + [0.0] * (L - 2)


def test_completion_segments_hold_context_clean_and_unsupervised(tmp_path, tok):
    segments = [dict(text="a b", train=False), dict(text="c"), dict(text="d", train=False)]
    rows, _ = _load(_write(tmp_path, [dict(prompt="q", completion=segments)]), tok, num_canvases=2,
                    supervise_padding=False)
    row, p = rows[0], int(rows[0]["prompt_len"])
    held, trained, held2 = tok.encode("a b"), tok.encode("c"), tok.encode("d")
    response = held + trained + held2 + [tok.eos_id]
    assert row["tokens"][p:p + len(response)].tolist() == response
    expected = [0.0] * len(held) + [1.0] * len(trained) + [0.0] * len(held2) + [1.0]  # EOS is trained
    assert row["loss_mask"].tolist() == expected + [0.0] * (2 * L - len(response))
    # the objective never corrupts what is not supervised, so the held tokens stay clean
    import jax

    from dgemma_jax.training.objective import ObjectiveConfig, draw_noise

    response_row = row["tokens"][None, p:p + 2 * L]
    noise = draw_noise(jax.random.key(0), response_row, row["loss_mask"][None], 512, ObjectiveConfig(t_min=0.99))
    held_at = row["loss_mask"][None] == 0
    assert (np.asarray(noise.canvases)[held_at] == response_row[held_at]).all()
    assert (np.asarray(noise.canvases)[~held_at] != response_row[~held_at]).any()
    for bad, why in ((dict(text="x", train="no"), "segment 0"), ([], "non-empty list"),
                     (dict(text="x", label=True), "segment 0")):
        with pytest.raises(data.MalformedLine, match=why):
            _load(_write(tmp_path, [dict(prompt="q", completion=bad if isinstance(bad, list) else [bad])]), tok)


def test_malformed_lines_raise_with_line_number_or_are_counted(tmp_path, tok):
    good = dict(prompt="a", completion="b")
    path = _write(tmp_path, [good, "{not json", dict(messages=[dict(role="user", content="x")]), good])
    with pytest.raises(data.MalformedLine, match=r"d\.jsonl:2: "):
        _load(path, tok)
    rows, stats = _load(path, tok, skip_malformed=True)
    assert stats.malformed == 2 and stats.examples == 2 == len(rows)
    with pytest.raises(data.MalformedLine, match=r":3: the last message must be the model's turn"):
        _load(_write(tmp_path, [good, good, dict(messages=[dict(role="user", content="x")])]), tok)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _load(tmp_path / "nope.jsonl", tok)


def test_overlong_examples_are_truncated_or_dropped(tmp_path, tok):
    long = dict(prompt="word " * 60, completion="x " * 30)
    path = _write(tmp_path, [long, dict(prompt="a", completion="b")])
    rows, stats = _load(path, tok, max_prompt_len=16, overlong="truncate")
    assert stats.truncated == 1 and len(rows) == 2
    r = rows[0]
    assert int(r["prompt_len"]) == 16 and r["tokens"][0] == tok.bos_id
    assert tok.eos_id not in r["tokens"][16:16 + L].tolist() and r["loss_mask"].all()  # no false EOS
    rows, stats = _load(path, tok, max_prompt_len=16, overlong="drop")
    assert stats.dropped == 1 and len(rows) == 1


def test_pipeline_resumes_with_the_next_batch(tmp_path, tok):
    rows, _ = _load(_write(tmp_path, [dict(prompt=str(i), completion=str(i)) for i in range(10)]), tok)
    it = iter(data.pipeline(rows, batch_size=3, seed=4))
    for _ in range(4):  # crosses an epoch boundary
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(3)]
    again = iter(data.pipeline(rows, batch_size=3, seed=4))
    again.set_state(json.loads(json.dumps(state)))
    for want in expected:
        np.testing.assert_array_equal(next(again)["tokens"], want)
    seen = []  # two processes: disjoint halves, together every example once per epoch
    for process in range(2):
        it = iter(data.pipeline(rows, batch_size=1, seed=0, process_index=process, process_count=2))
        seen.append({int(next(it)["tokens"][0, 1]) for _ in range(5)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 10


def test_overrides(tmp_path):
    cfg = load_config_file("configs/train/sudoku_scratch.py")
    apply_overrides(cfg, ["--config.optim.lr=3e-4", "--config.run.steps=7", "--config.lora.targets=('moe',)",
                          "--config.data.path=/x/y.jsonl", "--config.optim.warmup_steps=1"])
    assert cfg.optim.lr == 3e-4 and cfg.run.steps == 7 and cfg.lora.targets == ("moe",)
    assert cfg.data.path == "/x/y.jsonl"
    with pytest.raises(ConfigError, match="no field 'optim.learning_rate'"):
        apply_overrides(cfg, ["--config.optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="run.steps"):
        apply_overrides(cfg, ["--config.run.steps='many'"])
