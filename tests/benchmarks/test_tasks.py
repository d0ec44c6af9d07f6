"""``benchmarks/tasks.py``: the task generators, the scoring and the continual-learning metrics."""

from __future__ import annotations

import json
import math
import random

import pytest

from benchmarks.tasks import (
    BENCHMARK_TASKS,
    INSTRUCTION_WORDS,
    PRETRAIN_TASKS,
    SELECTION_MISTAKES,
    SELECTION_TASKS,
    WORDS,
    average_score,
    backward_transfer,
    exact_match,
    fewshot_block,
    forgetting,
    make_examples,
    pretraining_texts,
    relative_forgetting_rate,
    summarize,
    task_rows,
    words_of,
)

TASKS = {t.name: t for t in BENCHMARK_TASKS}


def test_the_benchmark_tasks() -> None:
    words = ["apple", "stone", "cloud", "salt"]
    assert TASKS["next"].answer(words) == "river"
    assert TASKS["before"].answer(words) == "salt"  # cyclic: before the first word is the last
    assert TASKS["partner"].answer(words) == WORDS[24] == "shadow"
    assert TASKS["next"].answer(["salt", "apple", "river", "stone"]) == "apple"
    assert TASKS["before"].input_text(words) == "before: apple stone cloud salt"
    assert words_of(TASKS["before"], "before: apple stone cloud salt") == tuple(words)
    with pytest.raises(ValueError):
        words_of(TASKS["next"], "before: apple river stone cloud")
    # Only the first word matters: the other three vary between examples of one mapping.
    assert TASKS["next"].answer(["apple", "salt", "king", "fish"]) == "river"


def test_the_families_are_disjoint_and_differ_on_every_input() -> None:
    instructions = [t.instruction for t in (*BENCHMARK_TASKS, *SELECTION_TASKS, *PRETRAIN_TASKS)]
    assert len(set(instructions)) == len(instructions)
    assert {t.instruction for t in (*BENCHMARK_TASKS, *SELECTION_TASKS)} == set(INSTRUCTION_WORDS)
    words = WORDS[:4]
    answers = [t.answer(words) for t in BENCHMARK_TASKS]
    assert len(set(answers)) == len(answers)  # a later task really overwrites an earlier one
    assert len(set(WORDS)) == len(WORDS) == 48


def test_each_benchmark_task_starts_with_its_own_third_of_the_words() -> None:
    thirds = [set(t.first_words) for t in BENCHMARK_TASKS]
    assert all(len(t) == 16 for t in thirds) and set().union(*thirds) == set(WORDS)
    assert not (thirds[0] & thirds[1] or thirds[0] & thirds[2] or thirds[1] & thirds[2])
    for task in BENCHMARK_TASKS:
        for text, answer in make_examples(task, 60, random.Random(task.name)):
            words = words_of(task, text)
            assert words[0] in task.first_words and len(set(words)) == 4 and set(words) <= set(WORDS)
            assert answer == task.answer(words)


def test_examples_are_distinct_seeded_and_respect_exclusions() -> None:
    task = TASKS["partner"]
    a = make_examples(task, 50, random.Random(1))
    assert a == make_examples(task, 50, random.Random(1))
    assert len({x for x, _ in a}) == 50
    held = [words_of(task, x) for x, _ in a[:25]]
    b = make_examples(task, 50, random.Random(2), exclude=held)
    assert not {words_of(task, x) for x, _ in b} & set(held)
    for x, y in b:
        assert y == task.answer(words_of(task, x)) and len(words_of(task, x)) == 4


def test_rows_and_corpus_formats() -> None:
    task = TASKS["next"]
    rows = task_rows(task, [("next: apple river stone cloud", "river")], prefix="t-")
    (row,) = rows
    assert row["interaction_id"] == "t-next-0" and row["domain"] == ["next"] and row["input"] == ""
    assert json.loads(row["messages"]) == [
        {"role": "user", "content": "next: apple river stone cloud"},
        {"role": "assistant", "content": "river"},
    ]
    block = fewshot_block("Examples.", [("copy: a b", "a b"), ("copy: c d", "c d")])
    assert block == "Examples.\n\nInput: copy: a b\nOutput: a b\n\nInput: copy: c d\nOutput: c d"
    docs = pretraining_texts(
        200,
        random.Random(0),
        lambda u, a: f"<u>{u}</u><a>{a}</a>",
        lambda n: f"Ex {n}.",
    )
    texts = ["".join(text for text, _ in doc) for doc in docs]
    assert any(t.startswith("<u>") for t in texts) and any(t.startswith("Ex ") for t in texts)
    # The benchmark's mappings are never shown (their names may name a renamed block's task).
    for task in BENCHMARK_TASKS:
        for text in texts:
            for line in text.splitlines():
                if line.startswith(f"Input: {task.instruction}: "):
                    words = line.split(": ", 2)[2].split()
                    if words[0] in WORDS:
                        following = text.split(line + "\nOutput: ", 1)[1].split("\n")[0]
                        assert following != task.answer(words) or task.answer(words) in words
    assert any(w in text for text in texts for w in INSTRUCTION_WORDS)  # but their words are known
    chat_docs = [doc for doc, t in zip(docs, texts) if t.startswith("<u>")]
    for doc in chat_docs[:20]:
        (marked,) = [text for text, random_words in doc if random_words]
        assert len(marked.split()) == 4 and marked.startswith(" ")  # the four input words, nothing else
    copies = sum(t.startswith("<u>copy:") for t in texts) / max(1, len(chat_docs))
    assert copies > 0.2  # copy is drawn five times as often as each of the 12 others
    # Half the few-shot blocks call their task by a random word, the same in every input.
    names = {t.name for t in PRETRAIN_TASKS}
    blocks = {t: t[3 : t.index(".")] for t in texts if t.startswith("Ex ")}  # "Ex <name>."
    renamed = [t for t, name in blocks.items() if name not in names]
    assert 0.4 < len(renamed) / len(blocks) < 0.8
    assert all(name in WORDS or name in INSTRUCTION_WORDS for t, name in blocks.items() if t in renamed)
    for text in renamed[:10]:
        name = blocks[text]
        inputs = [line for line in text.splitlines() if line.startswith("Input: ")]
        assert inputs and all(line.startswith(f"Input: {name}: ") for line in inputs)


def test_exact_match() -> None:
    assert exact_match(["Cloud  stone.", "x"], ["cloud stone", "y"]) == 0.5
    assert math.isnan(exact_match([], []))
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_continual_learning_metrics() -> None:
    # Stage j learns task j. Task 0: 0.9 -> 0.6 -> 0.3; task 1: 0.8 -> 0.8; task 2: 0.7.
    scores = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.0], [0.3, 0.8, 0.7]]
    assert average_score(scores) == pytest.approx((0.3 + 0.8 + 0.7) / 3)
    assert backward_transfer(scores) == pytest.approx(((0.3 - 0.9) + (0.8 - 0.8)) / 2)
    assert forgetting(scores) == pytest.approx((0.6 + 0.0) / 2)
    assert relative_forgetting_rate(scores) == pytest.approx((0.6 / 0.9 + 0.0) / 2)
    summary = summarize(scores)
    assert summary["last_task"] == 0.7 and summary["forgetting"] == pytest.approx(0.3)


def test_forgetting_uses_the_best_score_not_the_first() -> None:
    # Task 0 improves after stage 0 (positive transfer), then drops: forgetting counts from the peak.
    scores = [[0.5, 0.0, 0.0], [0.9, 0.7, 0.0], [0.6, 0.7, 0.8]]
    assert backward_transfer(scores) == pytest.approx(((0.6 - 0.5) + 0.0) / 2)
    assert forgetting(scores) == pytest.approx((0.3 + 0.0) / 2)
    assert relative_forgetting_rate(scores) == pytest.approx((0.3 / 0.9) / 2)
    # Never learned: no rate for that task; a single stage forgets nothing.
    assert relative_forgetting_rate([[0.0, 0.0], [0.0, 1.0]]) == 0.0
    assert forgetting([[1.0]]) == 0.0 and backward_transfer([[1.0]]) == 0.0
    with pytest.raises(ValueError):
        forgetting([[1.0, 0.0]])


def test_selection_tasks_are_known_operations_under_new_names_with_a_systematic_mistake() -> None:
    words = ["apple", "river", "stone", "cloud"]
    pretrain = {t.name: t.answer(words) for t in PRETRAIN_TASKS}
    selection = {t.name: t.answer(words) for t in SELECTION_TASKS}
    assert selection == {"head": pretrain["first"], "front": pretrain["first-two"], "trim": pretrain["drop-last"]}
    for task in SELECTION_TASKS:
        mistake = " ".join(SELECTION_MISTAKES[task.name](words))
        assert mistake != task.answer(words) and mistake in pretrain.values()
