import random

from benchmarks.data_selection import Options, hard_words, make_pool
from benchmarks.tasks import SELECTION_MISTAKES, SELECTION_TASKS, make_examples, words_of

TASKS = {t.name: t for t in SELECTION_TASKS}


def test_the_pool_is_poor_where_the_assistant_errs_and_noisy_elsewhere() -> None:
    o = Options()
    held = {t.name: {words_of(t, x) for x, _ in make_examples(t, 100, random.Random(t.name))} for t in SELECTION_TASKS}
    pool = make_pool(o, random.Random(0), held)
    assert pool == make_pool(o, random.Random(0), held)  # seeded
    assert len(pool) == 3 * o.pool_per_task
    hard = hard_words(o)
    assert len(hard) == o.hard_words
    poor = [p for p in pool if p["kind"] != "good"]
    assert 0.25 < len(poor) / len(pool) < 0.35  # a realistic share
    for p in pool:
        task = TASKS[p["task"]]
        words = list(words_of(task, p["input"]))
        assert words_of(task, p["input"]) not in held[task.name]  # the held-out inputs stay unseen
        assert p["hard"] == (words[0] in hard)
        if p["kind"] == "good":
            assert p["answer"] == task.answer(words)
        elif p["kind"] == "mistake":  # systematic, and only where the assistant errs
            assert p["hard"] and p["answer"] == " ".join(SELECTION_MISTAKES[task.name](words))
        else:
            assert not p["hard"] and p["answer"] != task.answer(words)
    on_hard = [p for p in pool if p["hard"]]
    assert 0.7 < sum(p["kind"] == "mistake" for p in on_hard) / len(on_hard) < 0.9
    # Ratings follow quality, with some missing and some wrong.
    rated = [p for p in pool if p["rating"] is not None]
    assert 0.7 < len(rated) / len(pool) < 0.8
    agree = sum((p["rating"] >= 4) == (p["kind"] == "good") for p in rated) / len(rated)
    assert 0.85 < agree < 0.95
