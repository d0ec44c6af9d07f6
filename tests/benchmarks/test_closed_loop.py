"""The closed-loop benchmark's measures on a run built by hand: acceptance against the paired
no-learning answers, forgetting, the sabotage goals, and the results file's request table."""

from __future__ import annotations

from benchmarks.closed_loop import Options, compact, expand, goals, summarize


def _request(t: float, phase: int, family: str, correct: bool, base: bool | None = None, honest: bool = True) -> dict:
    return {
        "t": t,
        "phase": phase,
        "family": family,
        "session": "s",
        "honest": honest,
        "interaction_id": f"i{t}",
        "correct": correct,
        "base_correct": base,
        "failed": None,
        "arm": None,
    }


def _run(name: str, after_next: bool, events: list[dict]) -> dict:
    o = Options(old_families=("first",), new_families=("next",))
    requests = [_request(float(i), 1, "first", True) for i in range(10)]
    requests += [_request(10.0 + i, 2, "next" if i % 2 else "first", i % 2 == 0) for i in range(10)]
    # After-phase (phase 3): each prompt answered by the champion and, unrecorded, by the base model.
    requests += [_request(100.0 + i, 3, "first", True, True) for i in range(10)]
    requests += [_request(200.0 + i, 3, "next", after_next, False) for i in range(10)]
    requests.append(_request(300.0, 3, "next", False, False, honest=False))  # a poisoner: not counted
    run = {"name": name, "new_families": ["next"], "events": events, "requests": requests}
    run["summary"] = summarize(run, o)
    return run


def test_acceptance_is_compared_with_no_learning_on_the_same_prompts() -> None:
    events = [
        {"t": 15.0, "what": "run r1", "value": "running"},
        {"t": 90.0, "what": "champion", "value": "adp-1"},
    ]
    s = _run("learning", True, events)["summary"]
    assert (s["acceptance_after"], s["acceptance_no_learning"]) == (1.0, 0.5)
    assert s["relative_improvement"] == 1.0 and s["forgetting_rate"] == 0.0
    assert s["per_family"]["next"] == {"live_before": 0.0, "after": 1.0, "no_learning": 0.0, "requests_after": 10}
    assert (s["trigger_s"], s["promotion_s"], s["trigger_to_promotion_s"], s["cycles_started"]) == (15.0, 90.0, 75.0, 1)
    assert s["failed_requests"] == 0


def test_goals_both_ways_and_the_request_table_round_trips() -> None:
    o = Options()
    learned = _run("learning", True, [{"t": 15.0, "what": "run r1", "value": "running"}])
    flat = _run("learning", False, [])
    caught = _run("sabotage", False, [{"t": 50.0, "what": "deployment d1", "value": "rolled_back"}])
    passed = {g["goal"]: g["passed"] for g in goals([learned, caught], o)}
    assert all(passed.values()), passed
    failed = {g["goal"]: g["passed"] for g in goals([flat], o)}
    assert failed["acceptance over the whole mix, after vs no learning (same prompts)"] is False
    table = compact(learned)
    assert table["requests"]["columns"][0] == "t" and len(table["requests"]["rows"]) == len(learned["requests"])
    back = expand(table)
    assert summarize(back, Options(old_families=("first",), new_families=("next",))) == learned["summary"]
