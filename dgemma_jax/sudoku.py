"""Sudoku: a puzzle generator, a solution counter, the text format the Sudoku model reads, scoring.

Grids are 81 ints in row-major order, 0 for a blank. Puzzles made here have exactly one solution.

Text format of the Sudoku model (see ``docs/sudoku.md``): the prompt names every cell and its
content with one token per cell, ``<r3c7=5>`` or ``<r3c7=_>`` for a blank (rows and columns
1-9), so that a cell's identity is in its embedding; the answer is the 81 solution digits,
each its own token, then EOS. The canvas thus holds exactly 81 digits + EOS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

_ALL = 0x3FE  # bits 1..9
_PEERS = []  # _PEERS[i]: indices sharing a row, column or box with cell i (not i itself)
for _i in range(81):
    _r, _c = divmod(_i, 9)
    _b = (_r // 3) * 3, (_c // 3) * 3
    _PEERS.append(
        sorted(
            (
                {_r * 9 + k for k in range(9)}
                | {k * 9 + _c for k in range(9)}
                | {(_b[0] + a) * 9 + _b[1] + b for a in range(3) for b in range(3)}
            )
            - {_i}
        )
    )
del _i, _r, _c, _b


def parse_grid(text: str, what: str = "puzzle") -> list[int]:
    """81 characters, digits with ``0`` or ``.`` for a blank -> 81 ints. ValueError otherwise."""
    s = text.strip()
    if len(s) != 81:
        raise ValueError(f"{what}: expected 81 characters, got {len(s)}")
    bad = sorted({ch for ch in s if ch not in "0123456789."})
    if bad:
        raise ValueError(f"{what}: unexpected character(s) {''.join(bad)!r} (use 1-9, and 0 or . for a blank)")
    return [0 if ch == "." else int(ch) for ch in s]


def grid_text(grid: Iterable[int]) -> str:
    return "".join(str(int(v)) for v in grid)


def _candidates(grid: list[int], i: int) -> int:
    used = 0
    for p in _PEERS[i]:
        used |= 1 << grid[p]
    return _ALL & ~used


def count_solutions(grid: Iterable[int], limit: int = 2) -> int:
    """Number of solutions of ``grid`` (0 = blank), counting stops at ``limit``."""
    g = [int(v) for v in grid]
    for i, v in enumerate(g):  # givens that clash make it unsolvable
        if v and any(g[p] == v for p in _PEERS[i]):
            return 0
    return _count(g, limit)


def _most_constrained(g: list[int]) -> tuple[int, int]:
    """(blank cell with the fewest candidates, its candidate bit mask); (-1, 0) when none is blank."""
    best, best_mask, best_n = -1, 0, 10
    for i in range(81):
        if g[i] == 0:
            mask = _candidates(g, i)
            n = bin(mask).count("1")
            if n < best_n:
                best, best_mask, best_n = i, mask, n
                if n <= 1:
                    break
    return best, best_mask


def _count(g: list[int], limit: int) -> int:
    best, best_mask = _most_constrained(g)
    if best < 0:
        return 1
    found = 0
    m = best_mask
    while m:
        bit = m & -m
        m ^= bit
        g[best] = bit.bit_length() - 1
        found += _count(g, limit - found)
        if found >= limit:
            break
    g[best] = 0
    return found


def solve(grid: Iterable[int]) -> list[int] | None:
    """One solution of ``grid`` or None."""
    g = [int(v) for v in grid]
    if count_solutions(g, 1) == 0:
        return None
    _fill(g, None)
    return g


def _fill(g: list[int], rng: np.random.Generator | None) -> bool:
    """Fills ``g`` in place by depth-first search (digits tried in random order when rng is given)."""
    best, best_mask = _most_constrained(g)
    if best < 0:
        return True
    digits = [d for d in range(1, 10) if best_mask >> d & 1]
    if rng is not None:
        rng.shuffle(digits)
    for d in digits:
        g[best] = d
        if _fill(g, rng):
            return True
    g[best] = 0
    return False


def random_solution(rng: np.random.Generator) -> list[int]:
    """A uniformly shuffled complete grid (random first row, then randomised depth-first search)."""
    g = [0] * 81
    g[:9] = [int(d) for d in rng.permutation(9) + 1]
    if not _fill(g, rng):  # cannot happen: any valid first row completes
        raise AssertionError("no completion")
    return g


def make_puzzle(rng: np.random.Generator, givens: int) -> tuple[list[int], list[int]]:
    """(puzzle, solution): a puzzle with exactly ``givens`` clues and one solution.

    Clues are removed from a random complete grid in random order, each removal kept only when the
    solution stays unique; a grid that cannot be thinned to ``givens`` is replaced by a new one.
    """
    if not 17 <= givens <= 81:
        raise ValueError(f"givens={givens}: must be in [17, 81]")
    while True:
        solution = random_solution(rng)
        puzzle = list(solution)
        count = 81
        for i in rng.permutation(81):
            if count == givens:
                return puzzle, solution
            puzzle[i] = 0
            if _count(list(puzzle), 2) == 1:
                count -= 1
            else:
                puzzle[i] = solution[i]
        if count == givens:
            return puzzle, solution


def puzzles(seed: int, count: int, min_givens: int = 28, max_givens: int = 40) -> Iterator[tuple[list[int], list[int]]]:
    """``count`` (puzzle, solution) pairs, givens uniform in [min_givens, max_givens], from ``seed``."""
    if not 17 <= min_givens <= max_givens <= 81:
        raise ValueError(f"givens range [{min_givens}, {max_givens}] must lie within [17, 81]")
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield make_puzzle(rng, int(rng.integers(min_givens, max_givens + 1)))


def augment(puzzle: list[int], solution: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """A random symmetry of the pair: digits relabelled, rows within bands, bands, columns within
    stacks and stacks permuted, maybe transposed. Uniqueness and the number of givens are kept."""
    relabel = np.concatenate([[0], rng.permutation(9) + 1])
    rows = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
    cols = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
    transpose = rng.random() < 0.5
    grids = []
    for grid in (puzzle, solution):
        g = relabel[np.asarray(grid).reshape(9, 9)][rows][:, cols]
        grids.append([int(v) for v in (g.T if transpose else g).reshape(-1)])
    return grids[0], grids[1]


# ---- the model's text format ----------------------------------------------------------------------
def cell_symbols() -> list[str]:
    """The 810 cell tokens ``<rRcC=V>`` (V = 1-9 or ``_``), then the digit tokens ``1``-``9``."""
    cells = [f"<r{i // 9 + 1}c{i % 9 + 1}={v}>" for i in range(81) for v in "_123456789"]
    return cells + [str(d) for d in range(1, 10)]


def prompt_text(puzzle: Iterable[int]) -> str:
    return "".join(f"<r{i // 9 + 1}c{i % 9 + 1}={v or '_'}>" for i, v in enumerate(puzzle))


def answer_text(solution: Iterable[int]) -> str:
    return grid_text(solution)


def completion_segments(puzzle: Iterable[int], solution: Iterable[int]) -> list[dict]:
    """The answer as completion segments in which the givens are held (``train: false``): they sit
    clean in the training canvas, as ``dgemma sudoku`` clamps them, and only blanks are supervised."""
    segments: list[dict] = []
    for given, digit in zip(puzzle, solution):
        train = not given
        if segments and segments[-1]["train"] == train:
            segments[-1]["text"] += str(digit)
        else:
            segments.append(dict(text=str(digit), train=train))
    return segments


def write_jsonl(path: str | os.PathLike, seed: int, count: int, min_givens: int = 28, max_givens: int = 40,
                variants: int = 1, hold_givens: bool = False, progress: bool = False) -> Path:
    """Writes ``count`` puzzles, each with ``variants`` symmetric copies (:func:`augment`; the first
    is the puzzle itself), as prompt/completion JSONL plus the raw grids, atomically.

    ``hold_givens``: the copies after the first hold their givens clean in the canvas
    (:func:`completion_segments`); the first copy supervises every cell, so the model also learns
    to read the givens from the prompt (what an unclamped sampler needs)."""
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            items = puzzles(seed, count, min_givens, max_givens)
            rng = np.random.default_rng([seed, 1])
            for base in tqdm(items, total=count, disable=not progress, desc="sudoku", unit="puzzle"):
                for k in range(variants):
                    puzzle, solution = base if k == 0 else augment(*base, rng)
                    held = hold_givens and k > 0
                    completion = completion_segments(puzzle, solution) if held else answer_text(solution)
                    record = dict(prompt=prompt_text(puzzle), completion=completion,
                                  puzzle=grid_text(puzzle), solution=grid_text(solution))
                    f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- scoring --------------------------------------------------------------------------------------
def is_valid_solution(puzzle: Iterable[int], answer: Iterable[int]) -> bool:
    """True when ``answer`` is a complete valid grid that keeps every given of ``puzzle``."""
    p, a = list(puzzle), list(answer)
    if len(a) != 81 or any(not 1 <= v <= 9 for v in a):
        return False
    if any(pv and pv != av for pv, av in zip(p, a)):
        return False
    return all(a[q] != a[i] for i in range(81) for q in _PEERS[i])


def score(puzzles_: list[list[int]], solutions: list[list[int]], answers: list[list[int]]) -> dict[str, float]:
    """exact-solve rate (a valid grid keeping the givens), blank-cell accuracy, givens kept."""
    exact = cells = blanks = kept = 0
    for p, s, a in zip(puzzles_, solutions, answers):
        exact += is_valid_solution(p, a)
        for pv, sv, av in zip(p, s, a):
            if pv:
                kept += av == pv
            else:
                blanks += 1
                cells += av == sv
    n = len(puzzles_)
    given_total = sum(1 for p in puzzles_ for v in p if v)
    return dict(exact=exact / n, cell_accuracy=cells / max(blanks, 1), givens_kept=kept / max(given_total, 1))


# ---- solving with a model -------------------------------------------------------------------------
def encode_prompts(tokenizer, puzzles_: list[list[int]]) -> np.ndarray:
    """[B, 82] prompt ids: BOS + one cell token per cell. ValueError when the tokenizer lacks them."""
    ids = [[tokenizer.bos_id] + tokenizer.encode(prompt_text(p)) for p in puzzles_]
    if any(len(row) != 82 for row in ids):
        raise ValueError("this tokenizer does not have the Sudoku cell tokens (<r1c1=_> ...): "
                         "use a Sudoku model (e.g. the embedded default)")
    return np.asarray(ids, np.int32)


def digit_ids(tokenizer) -> np.ndarray:
    """[10] token id of each digit 0-9 (index 0 unused: -1)."""
    ids = [-1] + [tokenizer.token_to_id(str(d)) for d in range(1, 10)]
    if any(i is None for i in ids):
        raise ValueError("the tokenizer has no single-token digits 1-9")
    return np.asarray(ids, np.int64)


def read_answers(tokenizer, generated) -> list[list[int]]:
    """Generated canvases [B, >= 81] token ids -> 81 digits per row; a non-digit token reads as 0."""
    to_digit = {int(t): d for d, t in enumerate(digit_ids(tokenizer)) if d}
    return [[to_digit.get(int(t), 0) for t in row[:81]] + [0] * (81 - len(row[:81])) for row in generated]


def clamp_ids(tokenizer, puzzles_: list[list[int]]) -> np.ndarray:
    """[B, 82] ``generate(clamp_ids=...)`` for these puzzles: each given's digit token, EOS last,
    -1 (free) on the blanks."""
    from dgemma_jax.generation import FREE

    digits = digit_ids(tokenizer)
    grid = np.asarray(puzzles_, np.int64).reshape(len(puzzles_), 81)
    clamp = np.full((len(puzzles_), 82), FREE, np.int64)
    clamp[:, :81] = np.where(grid > 0, digits[grid], FREE)
    clamp[:, 81] = tokenizer.eos_id
    return clamp


def solve_with_model(model, tokenizer, puzzles_: list[list[int]], *, clamp_givens: bool = True, seed: int = 0,
                     batch_size: int = 64, progress: bool = False, **sampler) -> tuple[list[list[int]], np.ndarray]:
    """Fills each puzzle with the model: one 82-token canvas (81 digits + EOS) per puzzle.

    ``clamp_givens``: the givens (and the EOS) are clamped in the canvas, so the model only writes
    the blanks and a given is never overwritten. ``sampler``: generate()'s sampler settings, e.g.
    ``max_denoising_steps=1`` for a one-step solve. Returns (answers, denoising steps per puzzle);
    a cell the model filled with anything but a digit reads as 0.
    """
    from tqdm.auto import tqdm

    from dgemma_jax.generation import generate

    if model.config.canvas_length < 82:
        raise ValueError(f"canvas_length={model.config.canvas_length}: a Sudoku needs 82 (81 digits + EOS)")
    answers, steps = [], []
    for start in tqdm(range(0, len(puzzles_), batch_size), disable=not progress, desc="sudoku", unit="batch"):
        chunk = puzzles_[start:start + batch_size]
        prompt = encode_prompts(tokenizer, chunk)
        clamp = clamp_ids(tokenizer, chunk) if clamp_givens else None
        result = generate(model, prompt, max_new_tokens=82, seed=seed + start, clamp_ids=clamp, **sampler)
        answers.extend(read_answers(tokenizer, result.sequences[:, 82:]))
        steps.extend(result.steps[:, 0].tolist())
    return answers, np.asarray(steps)


def evaluate(model_dir, seed: int, count: int = 200, min_givens: int = 28, max_givens: int = 40,
             progress: bool = False, **sampler) -> dict:
    """Scores a Sudoku model on ``count`` fresh puzzles from generator ``seed``: full refinement
    with the givens clamped (what ``dgemma sudoku`` does), the same without clamps, and one step."""
    import jax.numpy as jnp

    from dgemma_jax.api import from_pretrained
    from dgemma_jax.tokenizer import Tokenizer

    model = from_pretrained(model_dir, dtype=jnp.float32)
    tokenizer = Tokenizer.load(model_dir)
    pairs = list(puzzles(seed, count, min_givens, max_givens))
    ps, sols = [p for p, _ in pairs], [s for _, s in pairs]
    report: dict = dict(model=str(model_dir), puzzles=count, generator_seed=seed, givens=[min_givens, max_givens])
    runs = dict(full_clamped=dict(clamp_givens=True), full_unclamped=dict(clamp_givens=False),
                one_step_clamped=dict(clamp_givens=True, max_denoising_steps=1))
    for name, kw in runs.items():
        answers, steps = solve_with_model(model, tokenizer, ps, progress=progress, **kw, **sampler)
        report[name] = dict(score(ps, sols, answers), mean_steps=float(np.mean(steps)))
    return report
