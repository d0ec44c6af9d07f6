"""Small word tasks for the learning benchmarks, their scoring, and the continual-learning metrics
(average score, backward transfer, forgetting, relative forgetting rate).

Every task reads one input of the same shape, ``<instruction>: w1 w2 ... wn`` (lower-case common
English words), and answers with words, for example ``next: apple stone cloud salt`` -> ``river``
(the word after ``apple`` in :data:`WORDS`). Answers are a few tokens long, so a small model learns
a task in minutes on a CPU and greedy generation is scored by exact match.

Two families:

* :data:`BENCHMARK_TASKS` are learned one after another by ``benchmarks/forgetting.py`` (and make
  up ``benchmarks/data_selection.py``'s pool). Each maps the first word to another word of the
  list, so fine-tuning on a later task alone pulls the model towards the latest mapping for every
  input: measurable forgetting.
* :data:`PRETRAIN_TASKS` make up the general corpus a benchmark's base model is pre-trained on
  (:func:`pretraining_texts`): the analogue of an LLM's pre-training. They cover the benchmark's
  input distribution (the same words, lengths and ``Input: ... Output: ...`` blocks that SSR's
  prompts use) with positional transformations, but none of the benchmark's mappings.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.simulation import normalize_answer

__all__ = [
    "BENCHMARK_TASKS",
    "INSTRUCTION_WORDS",
    "PRETRAIN_TASKS",
    "SELECTION_MISTAKES",
    "SELECTION_TASKS",
    "WORDS",
    "Task",
    "average_score",
    "backward_transfer",
    "exact_match",
    "fewshot_block",
    "forgetting",
    "make_examples",
    "normalize_answer",
    "pretraining_texts",
    "relative_forgetting_rate",
    "task_rows",
]

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "table",
    "window",
    "orange",
    "silver",
    "music",
    "planet",
    "rabbit",
    "summer",
    "winter",
    "forest",
    "market",
    "doctor",
    "rocket",
    "coffee",
    "dragon",
    "engine",
    "flower",
    "hammer",
    "mirror",
    "needle",
    "shadow",
    "wallet",
    "house",
    "water",
    "paper",
    "horse",
    "bread",
    "chair",
    "train",
    "phone",
    "ocean",
    "beach",
    "snow",
    "moon",
    "tree",
    "bird",
    "fish",
    "book",
    "door",
    "ship",
    "king",
    "queen",
    "glass",
    "salt",
]
"""The words inputs are made of: 48 nouns, each a single token of Qwen2.5's tokenizer both with and
without a leading space, so that every task is a fixed pattern over token positions."""


INSTRUCTION_WORDS = ("next", "before", "partner", "head", "front", "trim")
"""The instruction words of :data:`BENCHMARK_TASKS` and :data:`SELECTION_TASKS`. The general corpus
uses them as ordinary input words, so that their embeddings are trained (in an LLM every common
word is), while the tasks they name are never shown under these names."""


@dataclass(frozen=True)
class Task:
    """One transformation: ``instruction`` names it in the input; ``apply`` maps the words."""

    name: str
    instruction: str
    apply: Callable[[list[str]], list[str]]
    lengths: tuple[int, ...] = (4,)
    """Numbers of words an input may have."""
    first_words: tuple[str, ...] = ()
    """The words an input may start with (empty: any)."""

    def input_text(self, words: Sequence[str]) -> str:
        return f"{self.instruction}: {' '.join(words)}"

    def answer(self, words: Sequence[str]) -> str:
        return " ".join(self.apply(list(words)))


def _shifted(offset: int) -> Callable[[list[str]], list[str]]:
    """The word ``offset`` places after the input's first word in :data:`WORDS` (cyclically)."""

    def apply(words: list[str]) -> list[str]:
        return [WORDS[(WORDS.index(words[0]) + offset) % len(WORDS)]]

    return apply


BENCHMARK_TASKS: tuple[Task, ...] = (
    Task("next", "next", _shifted(1), first_words=tuple(WORDS[0::3])),
    Task("before", "before", _shifted(-1), first_words=tuple(WORDS[1::3])),
    Task("partner", "partner", _shifted(len(WORDS) // 2), first_words=tuple(WORDS[2::3])),
)
"""Learned in this order by the forgetting benchmark: four words in, one word out, a fixed mapping
of the first word (its successor, its predecessor, the word half the list away). Each is knowledge
the base model has not got (16 associations, learned from examples whose other three words vary).
Each task's inputs start with its own third of the words, as real domains differ in their inputs,
so that one model can hold all three (trained on all three at once for as many steps as one
stage, a LoRA adapter reached 0.76 / 0.48 / 0.75; when the tasks shared their first words it
reached 0.03 / 0.02 / 0.01: the two-layer model could not learn to read the instruction). All
three answer from the same words at the same position, so that learning a later task alone
overwrites the earlier ones unless something protects them."""

PRETRAIN_TASKS: tuple[Task, ...] = (
    Task("copy", "copy", lambda w: list(w)),
    Task("first", "first", lambda w: w[:1]),
    Task("last", "last", lambda w: w[-1:]),
    Task("second", "second", lambda w: w[1:2]),
    Task("drop-first", "drop first", lambda w: w[1:]),
    Task("drop-last", "drop last", lambda w: w[:-1]),
    Task("first-two", "first two", lambda w: w[:2]),
    Task("last-two", "last two", lambda w: w[-2:]),
    Task("ends", "ends", lambda w: [w[0], w[-1]]),
    Task("repeat-first", "repeat first", lambda w: [w[0]] + w),
    Task("repeat-last", "repeat last", lambda w: w + [w[-1]]),
    Task("middle", "middle", lambda w: w[1:-1]),
    Task("third", "third", lambda w: w[2:3]),
)
"""The general corpus's transformations: copying, selecting and dropping by position."""

SELECTION_TASKS: tuple[Task, ...] = (
    Task("head", "head", lambda w: w[:1]),
    Task("front", "front", lambda w: w[:2]),
    Task("trim", "trim", lambda w: w[:-1]),
)
"""``benchmarks/data_selection.py``'s tasks: a project's own names for operations the base model
already does under others (``first``, ``first two``, ``drop last`` in :data:`PRETRAIN_TASKS`), the
way an assistant adapts to a team's conventions. One rule each, the same for every input, so that a
few hundred clean examples teach it and what more data adds is mostly its mistakes."""

SELECTION_MISTAKES: Mapping[str, Callable[[list[str]], list[str]]] = {
    "head": lambda w: w[2:3],
    "front": lambda w: w[:3],
    "trim": lambda w: list(w),
}
"""What an assistant answers when it misreads a :data:`SELECTION_TASKS` task (the wrong position,
one word too many, nothing trimmed): a systematic mistake, not noise, and one the base model can
make too (``third``, ``drop last``, ``copy``)."""


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """The share of predictions equal to their target after :func:`normalize_answer`; NaN for none."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        return float("nan")
    return sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(predictions, targets)) / len(targets)


def make_examples(
    task: Task,
    n: int,
    rng: random.Random,
    *,
    exclude: Iterable[tuple[str, ...]] = (),
    words: Sequence[str] = WORDS,
) -> list[tuple[str, str]]:
    """``n`` distinct ``(input, answer)`` pairs of ``task``, ``words`` drawn without repetition
    within an input; word tuples in ``exclude`` are never drawn (held-out sets stay unseen)."""
    seen = set(map(tuple, exclude))
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct inputs for {task.name}")
        if task.first_words:
            first = rng.choice(task.first_words)
            drawn = (first, *rng.sample([w for w in words if w != first], rng.choice(task.lengths) - 1))
        else:
            drawn = tuple(rng.sample(list(words), rng.choice(task.lengths)))
        if drawn in seen:
            continue
        seen.add(drawn)
        out.append((task.input_text(drawn), task.answer(drawn)))
    return out


def words_of(task: Task, text: str) -> tuple[str, ...]:
    """The words of an input of ``task`` (its instruction prefix removed)."""
    prefix = f"{task.instruction}:"
    if not text.startswith(prefix):
        raise ValueError(f"{text!r} is no input of {task.name}")
    return tuple(text[len(prefix) :].split())


TRAINING_SCHEMA_COLUMNS = (
    "interaction_id",
    "timestamp",
    "instruction",
    "input",
    "output",
    "quality_score",
    "domain",
    "complexity",
    "learning_type",
    "project_context",
    "features",
    "messages",
)


def task_rows(task: Task, examples: Sequence[tuple[str, str]], *, prefix: str = "") -> list[dict[str, Any]]:
    """Training rows of ``task`` with the columns ``jobs/build_dataset.py`` writes (the seed's
    training-dataset schema plus ``messages``): the input is the user's turn, the answer the
    assistant's, the task's name the domain."""
    now = datetime(2025, 1, 1, tzinfo=UTC)
    rows = []
    for i, (text, answer) in enumerate(examples):
        messages = [
            {"role": "user", "content": text},
            {"role": "assistant", "content": answer},
        ]
        rows.append(
            {
                "interaction_id": f"{prefix}{task.name}-{i}",
                "timestamp": now,
                "instruction": text,
                "input": "",
                "output": answer,
                "quality_score": 1.0,
                "domain": [task.name],
                "complexity": "simple",
                "learning_type": "new_knowledge",
                "project_context": "{}",
                "features": "{}",
                "messages": json.dumps(messages),
            }
        )
    return rows


def fewshot_block(description: str, examples: Sequence[tuple[str, str]]) -> str:
    """A task description and ``Input: ... / Output: ...`` paragraphs: the layout of SSR's 2-shot
    prompts (``app.learning.ssr.build_prompt``) with every answer filled in."""
    parts = [description.strip()] + [f"Input: {inp}\nOutput: {out}" for inp, out in examples]
    return "\n\n".join(parts)


def pretraining_texts(
    n: int,
    rng: random.Random,
    chat: Callable[[str, str], str],
    describe: Callable[[str], str],
    *,
    tasks: Sequence[Task] = PRETRAIN_TASKS,
    copy_weight: float = 5.0,
    chat_share: float = 0.5,
    rename_share: float = 0.6,
    shots: tuple[int, int] = (3, 5),
) -> list[list[tuple[str, bool]]]:
    """The general corpus: ``n`` documents, each either a few-shot block of one task
    (:func:`fewshot_block`, ``describe(task name)`` as its description) or one exchange of a task
    rendered by ``chat(user, assistant)`` (the tokenizer's chat template).

    A document comes as segments ``(text, random)`` that join into its text; ``random`` marks the
    input words, which are drawn at random (nothing can predict them, so pre-training may weigh
    them less). ``copy`` is drawn ``copy_weight`` times as often as another task: copying is
    what the others build on, and a small model learns it first (a curriculum in proportions).
    In ``rename_share`` of the few-shot blocks the task goes by a random word of the vocabulary
    (in its description and every input): the model cannot know the name, only copy it from the
    block's earlier inputs, which is what continuing SSR's prompts of an unseen task takes.
    Inputs draw from :data:`WORDS` and :data:`INSTRUCTION_WORDS`."""
    docs = []
    vocabulary = (*WORDS, *INSTRUCTION_WORDS)
    weights = [copy_weight if t.name == "copy" else 1.0 for t in tasks]
    for _ in range(n):
        (task,) = rng.choices(tasks, weights)
        if rng.random() < chat_share:
            examples = make_examples(task, 1, rng, words=vocabulary)
            text = chat(*examples[0])
        else:
            if rng.random() < rename_share:
                name = rng.choice(vocabulary)
                task = Task(name, name, task.apply, task.lengths)
            examples = make_examples(task, rng.randint(*shots), rng, words=vocabulary)
            text = fewshot_block(describe(task.name), examples)
        docs.append(_mark_inputs(text, task, [x for x, _ in examples]))
    return docs


def _mark_inputs(text: str, task: Task, inputs: Sequence[str]) -> list[tuple[str, bool]]:
    """``text`` cut into segments, the words of each input (after its instruction) marked."""
    segments: list[tuple[str, bool]] = []
    at = 0
    head = len(task.instruction) + 1  # "<instruction>:"
    for inp in inputs:
        start = text.index(inp, at)
        segments.append((text[at : start + head], False))
        segments.append((text[start + head : start + len(inp)], True))
        at = start + len(inp)
    segments.append((text[at:], False))
    return [seg for seg in segments if seg[0]]


# --- continual-learning metrics -----------------------------------------------------------------
# ``scores[j][i]``: the score on task i after training stage j (stage j learns task j).


def _check(scores: Sequence[Sequence[float]]) -> int:
    t = len(scores)
    if t == 0 or any(len(row) != t for row in scores):
        raise ValueError("scores must be a square matrix: one row per stage, one column per task")
    return t


def average_score(scores: Sequence[Sequence[float]]) -> float:
    """The mean score over all tasks after the last stage."""
    t = _check(scores)
    return sum(scores[-1]) / t


def backward_transfer(scores: Sequence[Sequence[float]]) -> float:
    """BWT (Lopez-Paz and Ranzato, 2017): the mean over earlier tasks of the final score minus the
    score just after learning the task; negative when learning later tasks hurt earlier ones."""
    t = _check(scores)
    if t < 2:
        return 0.0
    return sum(scores[-1][i] - scores[i][i] for i in range(t - 1)) / (t - 1)


def forgetting(scores: Sequence[Sequence[float]]) -> float:
    """The mean over earlier tasks of the best score any stage reached on the task (from the
    stage that learned it on) minus the final score."""
    t = _check(scores)
    if t < 2:
        return 0.0
    return sum(max(scores[j][i] for j in range(i, t)) - scores[-1][i] for i in range(t - 1)) / (t - 1)


def relative_forgetting_rate(scores: Sequence[Sequence[float]]) -> float:
    """The seed's forgetting rate (its ``ForgettingTestSuite``: how much of the performance on
    historical tasks a new model lost against the baseline that knew them), as a share: the mean
    over earlier tasks of (best - final) / best. Tasks never learned (best 0) are left out; 0 when
    none are left. The seed quotes 0.935 for Qwen2.5-14B without mitigation, goal < 0.3."""
    t = _check(scores)
    rates = []
    for i in range(t - 1):
        best = max(scores[j][i] for j in range(i, t))
        if best > 0:
            rates.append((best - scores[-1][i]) / best)
    return sum(rates) / len(rates) if rates else 0.0


def summarize(scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """Every metric above, and the score on the last task after the last stage."""
    return {
        "average": average_score(scores),
        "last_task": scores[-1][-1],
        "backward_transfer": backward_transfer(scores),
        "forgetting": forgetting(scores),
        "forgetting_rate": relative_forgetting_rate(scores),
    }


def rows_by_domain(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many rows each (primary) domain has."""
    counts: dict[str, int] = {}
    for row in rows:
        domain = (row.get("domain") or ["?"])[0]
        counts[domain] = counts.get(domain, 0) + 1
    return counts


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` (:func:`task_rows`) as a Parquet file of the training-row schema's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.artifacts import TRAINING_ROW_SCHEMA

    schema = pa.schema([TRAINING_ROW_SCHEMA.field(c) for c in TRAINING_SCHEMA_COLUMNS])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
