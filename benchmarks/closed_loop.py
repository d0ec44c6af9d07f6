"""The closed loop, measured: agent traffic goes in, and the model that serves it gets better by itself.

A simulated population of users talks to a running Kaizen (``actors.stack.start_kaizen``: the Serve
app with collector, scorer and generator, the scheduler and the deployer actors) only through its
HTTP API: chat completions for ``champion`` with the official ``openai`` client, each user in a
session of their own (``X-Kaizen-Session``: the canary's sticky split), and their feedback on
every answer with the Kaizen client. The base model is the benchmarks' pre-trained word model
(``benchmarks/base_model.py``), the tasks the word tasks of ``benchmarks/tasks.py``:

* phase 1: the users ask what the base model already does (``first``, ``last``, ``first two``);
* phase 2 (and one more per further new family): a task family it does badly appears (``next``),
  half of the requests. Users accept right answers and correct wrong ones with the right answer.

Nothing is driven by hand: the scheduler's volume trigger starts a cycle (dataset from the
corrections and the accepted answers, the dataset checks, SSR rehearsal of the champion's
dataset from the second cycle on, LoRA training, the validation job), the deployer canaries a
production verdict on live traffic and promotes it or rolls it back. After the last phase the
users go on for ``after_requests`` requests, each asked also of the base model unrecorded
(``X-Kaizen-Record: false``): the *no learning* baseline on the same prompts.

Runs, each on a fresh store with the same traffic:

* ``learning``: as above;
* ``corrections ignored``: ``dataset.corrections: false`` (learning from accepted answers alone);
* ``sabotage``: a share of the users send wrong corrections, even of right answers (poisoned
  feedback). Goal: the poisoned adapter is rejected by validation or rolled back by the canary,
  and the honest users' live acceptance is never more than 10 % below the champion's for longer
  than the canary window.

Goals (issue 19): acceptance over the whole mix after against before (at least +17 % relative),
forgetting on the earlier families (relative rate below 0.3), failed requests 0; reported also:
acceptance on the new family, the wall time from trigger to promotion. Prints a table, writes
``benchmarks/results/closed_loop.json`` and a plot of live acceptance per family over time
(``benchmarks/results/closed_loop.png``).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from app.simulation import Family, Population, Request, Watcher
from benchmarks.common import print_table
from benchmarks.tasks import BENCHMARK_TASKS, PRETRAIN_TASKS, Task, make_examples

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["Options", "loop_config", "main", "run_loop", "word_family"]


def word_family(task: Task) -> Family:
    return Family(task.name, lambda rng: make_examples(task, 1, rng)[0])


# --- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    old_families: tuple[str, ...] = ("first", "last", "first-two")
    """What the base model already does (benchmarks/tasks.PRETRAIN_TASKS)."""
    new_families: tuple[str, ...] = ("next",)
    """Appear one after another, each in a phase of its own (benchmarks/tasks.BENCHMARK_TASKS); the
    baseline runs meet the first alone. From the second on, a cycle rehearses the champion's
    dataset with SSR (each new family takes a phase of its own: twice the time for two)."""
    new_share: float = 0.5
    users: int = 24
    threads: int = 3
    pause_s: float = 0.1
    """Between two requests of a thread: a busy but bounded stream (the cycle trains on the same cores)."""
    phase1_requests: int = 100
    """Fewer than min_interactions: the first cycle is triggered by the new family's traffic."""
    after_requests: int = 300
    phase_timeout_min: float = 25.0
    min_interactions: int = 400
    """training.min_interactions: new answers above the threshold or corrected since the last cycle.
    With half the traffic on the new family, a first cycle then has some 150 corrections of it; on
    200 (about 50 corrections) the adapter answered one or two words to every ``next`` input and
    its canary rolled it back (the scorer and the users agreeing)."""
    poison_share: float = 0.4
    canary_share: float = 0.5
    min_interactions_per_arm: int = 40
    max_canary_minutes: float = 15.0
    watch_minutes: float = 1.0
    seed: int = 0


QUICK = {
    "phase1_requests": 30,
    "after_requests": 40,
    "min_interactions": 30,
    "min_interactions_per_arm": 10,
    "phase_timeout_min": 15.0,
}


def loop_config(
    base_model: str, work: Path, o: Options, *, port: int, corrections: bool = True, quick: bool = False
) -> Any:
    """Kaizen as the embedded default runs it, on ``base_model`` with its store and artifacts in
    ``work``: small thresholds (the loop's pace), the word tasks' training recipe (benchmarks/forgetting.py)."""
    from app.config import KaizenConfig

    return KaizenConfig.model_validate(
        {
            "model": {
                "base_model": base_model,
                "storage_root": str(work),
                "checkpoint_dir": str(work / "checkpoints"),
                "deployment_strategy": "staged",
            },
            "store": {"sqlite_path": str(work / "kaizen.db")},
            "privacy": {"hmac_key": "closed-loop"},
            "ray": {"namespace": f"kaizen-loop-{uuid.uuid4().hex[:6]}"},
            "training": {
                "min_interactions": o.min_interactions,
                "check_interval_s": 2,
                "backoff_minutes": 0.5,
                "resource_limits": {"max_system_memory_gb": 1},
            },
            "dataset": {
                "corrections": corrections,
                "min_examples": 16,
                "keep_fraction": 1.0,
                "max_group_share": 1.0,
                "validation_fraction": 0.15,
            },
            "learn": {"min_train_rows": 16, "max_group_share": 1.0},
            "finetune": {
                "lora_rank": 16,
                "lora_alpha": 32.0,
                "lora_dropout": 0.0,
                "lr": 1e-3,
                "warmup_fraction": 0.05,
                "select_by": "exact_match",
                "epochs": 2 if quick else 40,
                # A cycle that waited has thousands of rows: 40 of their epochs took an hour here.
                "max_steps": 20 if quick else 1500,
                "early_stopping_patience": 5,
                "batch_size": 8,
                "max_length": 64,
                "rehearsal_ratio": 0.25,
                "num_workers": 1,
                "cpus_per_worker": 1,
                "continue_from": "champion",
            },
            "ssr": {
                "min_demonstrations": 16,
                "top_p": 1.0,
                "prompts_per_domain": 120,
                "samples_per_prompt": 4,
                "rehearsal_instances_per_domain": 96,
                "num_clusters": 20,
                "max_input_tokens": 24,
                "max_output_tokens": 8,
                "num_cpus": 1,
            },
            # On a 128-wide model an unmerged LoRA adapter is a large share of each token's compute (on
            # Qwen2.5-7B a small one): the latency gate is for real weights, not this model.
            "validation": {"max_new_tokens": 8, "max_latency_increase": 1.0},
            "deploy": {
                "canary_share": o.canary_share,
                "min_interactions_per_arm": o.min_interactions_per_arm,
                "max_latency_increase": 1.0,
                "max_canary_minutes": o.max_canary_minutes,
                "watch_minutes": o.watch_minutes,
                "check_interval_s": 2,
            },
            "serve": {
                "host": "127.0.0.1",
                "port": port,
                "app_name": "kaizen-loop",
                "collector": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "scorer": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "generator": {
                    "num_cpus": 0.5,
                    "default_max_tokens": 8,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                },
            },
        }
    )


def run_loop(
    cfg: Any,
    o: Options,
    families: dict[str, Family],
    *,
    name: str,
    new_families: Sequence[str],
    poison_share: float = 0.0,
) -> dict[str, Any]:
    """One run of the loop on ``cfg`` (Ray must be up): the phases, then the after-phase with the
    paired no-learning baseline; what the users saw and what the loop did."""
    from actors.stack import start_kaizen, stop_kaizen

    t0 = time.monotonic()
    url = start_kaizen(cfg)
    print(f"  {name}: Kaizen up at {url} ({time.monotonic() - t0:.0f} s)", flush=True)
    users = Population(
        url,
        cfg.model.base_model,
        users=o.users,
        threads=o.threads,
        seed=o.seed,
        poison_share=poison_share,
        pause_s=o.pause_s,
    )
    watcher = Watcher(cfg, users.started)
    old = [families[n] for n in o.old_families]
    phases: list[dict[str, Any]] = []
    try:
        users.set_phase(1, old, 0.0)
        users.run(lambda: users.count(1) >= o.phase1_requests, o.phase_timeout_min * 60)
        phases.append({"phase": 1, "families": list(o.old_families), "until_s": round(users.requests[-1].t, 1)})
        for k, new in enumerate(new_families, start=2):
            t_start = time.monotonic() - users.started
            users.set_phase(k, [*old, families[new]], o.new_share)
            # The learning run goes on until a challenger is promoted (cycles that fall short are
            # followed by others on more data); a baseline until its first deployment or cycle ends.
            until = watcher.promoted_after if name == "learning" else watcher.settled_after
            settled = users.run(lambda t=t_start, until=until: until(t), o.phase_timeout_min * 60)
            phases.append({"phase": k, "new": new, "settled": settled, "from_s": round(t_start, 1)})
            print(
                f"  {name}: phase {k} ({new}) {'settled' if settled else 'timed out'}; {watcher.events[-3:]}",
                flush=True,
            )
            old = [*old, families[new]]
        after = len(new_families) + 2
        # The after-phase asks every family alike (the new ones each as often as an old one).
        users.set_phase(after, old, 0.0, paired=True)
        users.run(lambda: users.count(after) >= o.after_requests, o.phase_timeout_min * 60)
    finally:
        delivered = users.close()
        watcher.close()
        stop_kaizen(cfg, end_cycles=True)
    arms = _arms(cfg, users.requests)
    return {
        "name": name,
        "new_families": list(new_families),
        "poison_share": poison_share,
        "phases": phases,
        "events": watcher.events,
        "feedback_delivered": delivered,
        "requests": [asdict(r) | {"arm": arms.get(r.interaction_id)} for r in users.requests],
        "seconds": round(time.monotonic() - t0, 1),
    }


def _arms(cfg: Any, requests: Sequence[Request]) -> dict[str, str]:
    """Which arm answered each recorded request (the store's ``serving_arm``, else its model)."""
    from app.store import open_store

    store = open_store(cfg.store)
    try:
        rows = store._fetch("SELECT id, serving_arm, model_version FROM interactions")
    finally:
        store.close()
    ids = {r.interaction_id for r in requests}
    return {r["id"]: r["serving_arm"] or r["model_version"] or "base" for r in rows if r["id"] in ids}


# --- what it shows -----------------------------------------------------------------------------


def _rate(requests: Sequence[dict[str, Any]], key: str = "correct") -> float | None:
    values = [r[key] for r in requests if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def summarize(run: dict[str, Any], o: Options) -> dict[str, Any]:
    """What the honest users saw: per family, acceptance live before the first cycle started and in
    the after-phase, and the base model's on the after-phase's own prompts (*no learning*, paired).
    The goals compare the after-phase with no learning on the same prompts: the relative change over
    the whole mix, and forgetting on the old families (the relative drop, 0 where there is none)."""
    reqs = [r for r in run["requests"] if r["honest"]]
    new_families = tuple(run["new_families"])
    events = run["events"]
    started = [e["t"] for e in events if e["what"].startswith("run") and e["value"] == "running"]
    promoted = [e["t"] for e in events if e["what"] == "champion" and e["value"] != "(base model)"]
    first_cycle = started[0] if started else float("inf")
    after_phase = len(new_families) + 2
    live_before = [r for r in reqs if r["t"] < first_cycle and r["phase"] <= 2]
    after = [r for r in reqs if r["phase"] == after_phase]
    paired = [r for r in after if r["base_correct"] is not None and r["correct"] is not None]
    per_family = {
        f: {
            "live_before": _rate([r for r in live_before if r["family"] == f]),
            "after": _rate([r for r in paired if r["family"] == f]),
            "no_learning": _rate([r for r in paired if r["family"] == f], "base_correct"),
            "requests_after": sum(r["family"] == f for r in paired),
        }
        for f in (*o.old_families, *new_families)
    }
    mix_after, mix_base = _rate(paired), _rate(paired, "base_correct")
    forgetting = [
        max(0.0, (v["no_learning"] - v["after"]) / v["no_learning"])
        for f, v in per_family.items()
        if f in o.old_families and v["no_learning"] and v["after"] is not None
    ]
    failed = [r for r in run["requests"] if r["failed"]]
    return {
        "acceptance_live_before": _rate(live_before),
        "acceptance_after": mix_after,
        "acceptance_no_learning": mix_base,
        "relative_improvement": (mix_after - mix_base) / mix_base if mix_base and mix_after is not None else None,
        "per_family": per_family,
        "forgetting_rate": sum(forgetting) / len(forgetting) if forgetting else None,
        "failed_requests": len(failed),
        "failures": [r["failed"] for r in failed[:5]],
        "requests": len(run["requests"]),
        "cycles_started": len(started),
        "trigger_s": started[0] if started else None,
        "promotion_s": promoted[0] if promoted else None,
        "trigger_to_promotion_s": promoted[0] - started[0] if promoted and started else None,
        "longest_dip_s": _longest_dip(reqs, _rate(live_before)),
    }


def _longest_dip(requests: Sequence[dict[str, Any]], champion: float | None, window: int = 30) -> float | None:
    """The longest stretch (seconds) over which the honest users' acceptance, over a moving window
    of ``window`` requests, stayed more than 10 % below the champion's before any cycle."""
    if not champion:
        return None
    ordered = sorted((r for r in requests if r["correct"] is not None), key=lambda r: r["t"])
    longest, since = 0.0, None
    for i in range(window, len(ordered) + 1):
        part = ordered[i - window : i]
        low = sum(r["correct"] for r in part) / window < 0.9 * champion
        t = part[-1]["t"]
        if low and since is None:
            since = t
        if not low and since is not None:
            longest, since = max(longest, t - since), None
    if since is not None:
        longest = max(longest, ordered[-1]["t"] - since)
    return round(longest, 1)


def plot(runs: Sequence[dict[str, Any]], o: Options, path: Path, window: int = 40) -> None:
    """Live acceptance per family over time (moving window of requests), one panel per run, with
    the loop's events as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        reqs = sorted((r for r in run["requests"] if r["honest"] and r["correct"] is not None), key=lambda r: r["t"])
        for family in [*o.old_families, *run["new_families"]]:
            mine = [r for r in reqs if r["family"] == family]
            xs = [mine[i]["t"] / 60 for i in range(window - 1, len(mine))]
            ys = [
                sum(r["correct"] for r in mine[i - window + 1 : i + 1]) / window for i in range(window - 1, len(mine))
            ]
            ax.plot(xs, ys, label=family)
        for e in run["events"]:
            if e["what"] == "champion" and e["value"] != "(base model)":
                ax.axvline(e["t"] / 60, color="green", linestyle="--", linewidth=1)
            elif e["what"].startswith("run") and e["value"] == "running":
                ax.axvline(e["t"] / 60, color="grey", linestyle=":", linewidth=1)
            elif e["what"].startswith("deployment") and e["value"] == "rolled_back":
                ax.axvline(e["t"] / 60, color="red", linestyle="--", linewidth=1)
        ax.set_title(f"{run['name']}: live acceptance per family ({window}-request window)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("minutes")
        ax.legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.005, "grey: a cycle starts; green: a promotion; red: a rollback", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from benchmarks.base_model import BaseSettings, ensure_base_model
    from benchmarks.common import add_common_arguments, machine, quiet_process, work_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "closed_loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--runs", default="learning,corrections_ignored,sabotage", help="comma-separated subset of the runs"
    )
    parser.add_argument(
        "--new-families",
        default=None,
        help="comma-separated new task families, one phase each (default next); from the second on a cycle "
        "rehearses the champion's dataset with SSR",
    )
    args = parser.parse_args()
    o = replace(Options(**(QUICK if args.quick else {})), seed=args.seed)
    if args.new_families:
        known = {t.name for t in BENCHMARK_TASKS}
        families = tuple(args.new_families.split(","))
        if not set(families) <= known:
            parser.error(f"--new-families: each of {', '.join(sorted(known))}")
        o = replace(o, new_families=families)
    s = BaseSettings(**({"pretrain_steps": 60, "copy_warmup_steps": 20} if args.quick else {}))
    quiet_process()
    output = args.output or RESULTS / "closed_loop.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    tasks = {t.name: t for t in (*PRETRAIN_TASKS, *BENCHMARK_TASKS)}
    families = {n: word_family(tasks[n]) for n in (*o.old_families, *o.new_families)}
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "closed_loop",
        "quick": args.quick,
        "options": asdict(o),
        "machine": machine(),
        "runs": [],
    }
    with work_folder(args.keep, "kaizen-closed-loop-") as work:
        base_dir, base = ensure_base_model(work, args.base_cache, s, required=() if args.quick else ("first", "last"))
        result["base_model"] = {**base, "path": str(base_dir)}
        for name in args.runs.split(","):
            # A Ray cluster of its own for each run: a cycle still training when a run ends (the
            # scheduler's cycles outlive Serve) goes with it instead of holding the next run's CPU.
            _start_ray()
            run_work = work / name
            run_work.mkdir(parents=True, exist_ok=True)
            if not (run_work / "models").exists():  # the tokenizer ensure_base_model put there
                (run_work / "models").symlink_to(work / "models", target_is_directory=True)
            cfg = loop_config(
                str(base_dir),
                run_work,
                o,
                port=_free_port(),
                corrections=name != "corrections_ignored",
                quick=args.quick,
            )
            # The learning run meets every new family (from the second on, a cycle rehearses the
            # champion's dataset with SSR); the baselines the first, which is what they are about.
            run = run_loop(
                cfg,
                o,
                families,
                name=name,
                new_families=o.new_families if name == "learning" else o.new_families[:1],
                poison_share=o.poison_share if name == "sabotage" else 0.0,
            )
            _stop_ray()
            run["summary"] = summarize(run, o)
            result["runs"].append(run)
            partial = {**result, "runs": [compact(r) for r in result["runs"]], "complete": False}
            output.write_text(json.dumps(partial, default=str))
    result["complete"] = True
    result["goals"] = goals(result["runs"], o)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    report(result)
    plot(result["runs"], o, output.with_suffix(".png"))
    output.write_text(json.dumps({**result, "runs": [compact(r) for r in result["runs"]]}, default=str))
    print(f"\nwrote {output} and {output.with_suffix('.png')}")


REQUEST_COLUMNS = ("t", "phase", "family", "honest", "correct", "base_correct", "arm", "failed")


def compact(run: dict[str, Any]) -> dict[str, Any]:
    """The run as the results file keeps it: its requests as rows of :data:`REQUEST_COLUMNS`
    (tens of thousands of them: a table, not objects)."""
    rows = [[round(r["t"], 1) if c == "t" else r.get(c) for c in REQUEST_COLUMNS] for r in run["requests"]]
    return {**run, "requests": {"columns": list(REQUEST_COLUMNS), "rows": rows}}


def expand(run: dict[str, Any]) -> dict[str, Any]:
    """A run read back from a results file, its requests as objects again (:func:`compact`'s inverse)."""
    table = run["requests"]
    if isinstance(table, list):
        return run
    return {**run, "requests": [dict(zip(table["columns"], row)) for row in table["rows"]]}


def goals(runs: Sequence[dict[str, Any]], o: Options) -> list[dict[str, Any]]:
    by = {r["name"]: r["summary"] for r in runs}
    out: list[dict[str, Any]] = []
    if "learning" in by:
        s = by["learning"]
        out += [
            _goal(
                "acceptance over the whole mix, after vs no learning (same prompts)",
                s["relative_improvement"],
                ">= +17 %",
                lambda v: v >= 0.17,
            ),
            _goal(
                "forgetting on the earlier families (relative rate)", s["forgetting_rate"], "< 0.3", lambda v: v < 0.3
            ),
            _goal("failed requests", s["failed_requests"], "0", lambda v: v == 0),
        ]
    if "sabotage" in by:
        r = next(x for x in runs if x["name"] == "sabotage")
        caught = any(e["value"] == "rolled_back" for e in r["events"] if e["what"].startswith("deployment"))
        champion_moved = any(e["what"] == "champion" and e["value"] != "(base model)" for e in r["events"])
        out.append(
            _goal(
                "sabotage: poisoned adapter rejected or rolled back", float(caught or not champion_moved), "yes", bool
            )
        )
        out.append(
            _goal(
                "sabotage: longest dip > 10 % below the champion (s)",
                by["sabotage"]["longest_dip_s"],
                f"<= canary window {o.max_canary_minutes * 60:.0f} s",
                lambda v: v <= o.max_canary_minutes * 60,
            )
        )
    return out


def _goal(name: str, measured: float | None, target: str, ok: Callable[[float], bool]) -> dict[str, Any]:
    return {
        "goal": name,
        "measured": measured,
        "target": target,
        "passed": None if measured is None else bool(ok(measured)),
    }


def report(result: dict[str, Any]) -> None:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    print_table(
        (
            "run",
            "requests",
            "failed",
            "live before",
            "after",
            "no learning",
            "after vs none",
            "forgetting",
            "cycles",
            "trigger s",
            "promoted s",
        ),
        [
            (
                r["name"],
                s["requests"],
                s["failed_requests"],
                fmt(s["acceptance_live_before"]),
                fmt(s["acceptance_after"]),
                fmt(s["acceptance_no_learning"]),
                fmt(s["relative_improvement"]),
                fmt(s["forgetting_rate"]),
                s["cycles_started"],
                fmt(s["trigger_s"]),
                fmt(s["promotion_s"]),
            )
            for r in result["runs"]
            for s in [r["summary"]]
        ],
    )
    print_table(
        ("run", "family", "live before", "after", "no learning", "requests after"),
        [
            (r["name"], f, fmt(v["live_before"]), fmt(v["after"]), fmt(v["no_learning"]), v["requests_after"])
            for r in result["runs"]
            for f, v in r["summary"]["per_family"].items()
        ],
    )
    print_table(
        ("goal", "measured", "target", "result"),
        [
            (
                g["goal"],
                fmt(g["measured"]),
                g["target"],
                "NOT MEASURED" if g["passed"] is None else "PASS" if g["passed"] else "FAIL",
            )
            for g in result["goals"]
        ],
    )


def _start_ray() -> None:
    from benchmarks.common import start_local_ray

    start_local_ray()


def _stop_ray() -> None:
    import ray

    ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
