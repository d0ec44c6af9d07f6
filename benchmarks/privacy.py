"""Privacy filter benchmark: ``python -m benchmarks.privacy [--n 400] [--repeat 5] [--candidate PATH]``.

Measures, in one run on this machine, the cost per interaction of :func:`app.privacy.redact` on
~2 KB interactions (a prose request, a Python code block taken from the standard library's own
sources, a prose remark; one in ten carries planted personal data or a secret), beside the
baseline of detect-secrets' own scanner (every default plugin, ``scan_line`` over each line) on
the same interactions. Also counts findings on the clean interactions (every one that is not an
author's e-mail address is a false positive) and how many planted values each catches.

``--candidate PATH`` times another implementation of the same API (a file defining ``redact``)
in the same run, for comparing a change against the current filter.

Prints a table and writes ``benchmarks/results/privacy.json``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.sample import stdlib_functions
from benchmarks.common import pct, print_table

RESULTS = Path(__file__).resolve().parent / "results"

# Planted values: (kind, text with the value, the value that must not survive).
_PLANTED = (
    ("email", "Send the report to {user}@example-corp.com when it passes.", "{user}@example-corp.com"),
    ("home_path", "The repo is checked out in /home/{user}/work/project.", "/home/{user}/"),
    ("url_password", "It fails with postgres://{user}:S3cretPassw0rd@db.internal:5432/app", "S3cretPassw0rd"),
    ("phone", "Call me on +1 415 555 0134 if it is unclear.", "415 555 0134"),
    ("aws_key", "The CI uses AWS_ACCESS_KEY_ID=AKIAQ3EGRTK7N2XWLP4M for uploads.", "AKIAQ3EGRTK7N2XWLP4M"),
    ("password_assignment", 'config = {"user": "{user}", "password": "hunter2-{user}"}', "hunter2-{user}"),
    (
        "github_token",
        "export GITHUB_TOKEN=ghp_R8x2Lq9Vt4Zk7Wm3Yn6Bh1Pc5Jd0Gf2Ks8Ta",
        "ghp_R8x2Lq9Vt4Zk7Wm3Yn6Bh1Pc5Jd0Gf2Ks8Ta",
    ),
    ("ipv4", "The staging box is 81.2.69.160, port 8443.", "81.2.69.160"),
)
_USERS = ("alice", "bob", "carol", "dmitri", "eunji", "farid")


def _functions() -> list[tuple[str, str, str]]:
    """(name, first docstring line, source) of documented stdlib functions of a useful size."""
    return [(f"{f.module}.{f.name}", f.doc, f.source) for f in stdlib_functions() if 200 < len(f.source) < 1600]


def build_interactions(n: int, seed: int = 7, planted_share: float = 0.1) -> list[tuple[str, str | None, str | None]]:
    """``n`` texts of ~2 KB: (text, planted kind or None, planted value or None)."""
    rng = random.Random(seed)
    functions = _functions()
    out = []
    while len(out) < n:
        name, doc, source = rng.choice(functions)
        text = (
            f"I need `{name}` for my project; the docs say: {doc} Can you write it without the import, "
            f"with the same behaviour on edge cases?\n\nHere is an implementation:\n\n```python\n{source}```\n\n"
            "It keeps the signature of the original; the tests in the repository should pass unchanged. "
        )
        while len(text) < 1800:  # pad with more real code up to ~2 KB
            text += f"\nA related helper:\n\n```python\n{rng.choice(functions)[2]}```\n"
        text = text[:2200]
        kind = value = None
        if rng.random() < planted_share:
            kind, sentence, value = rng.choice(_PLANTED)
            user = rng.choice(_USERS)
            sentence, value = sentence.replace("{user}", user), value.replace("{user}", user)
            cut = rng.randrange(len(text) // 2)
            text = text[:cut] + "\n" + sentence + "\n" + text[cut:]
        out.append((text, kind, value))
    return out


def bench_filter(
    label: str, redact: Callable[[str], Any], items: list[tuple[str, str | None, str | None]], repeat: int
) -> dict[str, Any]:
    """Cost per call (every interaction, ``repeat`` times), false positives, planted values caught."""
    for text, _, _ in items[:20]:
        redact(text)  # warm up: regex caches, lazy imports
    costs = []
    perf = time.perf_counter_ns
    for _ in range(repeat):
        for text, _, _ in items:
            t0 = perf()
            redact(text)
            costs.append((perf() - t0) / 1000)
    clean = [t for t, kind, _ in items if kind is None]
    false_positives = sum(sum(1 for f in redact(t).findings if f != "email") for t in clean)
    planted = [(t, v) for t, kind, v in items if kind is not None]
    caught = sum(1 for t, v in planted if v not in redact(t).text)
    return {
        "filter": label,
        "calls": len(costs),
        "p50_us": pct(costs, 50),
        "p99_us": pct(costs, 99),
        "mean_us": statistics.fmean(costs),
        "non_email_findings_per_clean_interaction": false_positives / max(1, len(clean)),
        "planted_caught": f"{caught}/{len(planted)}",
    }


def bench_detect_secrets(items: list[tuple[str, str | None, str | None]], n: int) -> dict[str, Any]:
    """The baseline: detect-secrets' adhoc scanner over each line, every default plugin. It only
    reports (it does not redact), so a planted value counts as caught when its line is flagged."""
    from detect_secrets.core.scan import scan_line
    from detect_secrets.settings import default_settings

    sample = items[:n]
    costs, false_positives, clean, caught, planted = [], 0, 0, 0, 0
    with default_settings():
        for text, kind, value in sample:
            flagged_lines = []
            t0 = time.perf_counter_ns()
            for line in text.splitlines():
                if any(True for _ in scan_line(line)):
                    flagged_lines.append(line)
            costs.append((time.perf_counter_ns() - t0) / 1000)
            if kind is None:
                clean += 1
                false_positives += len(flagged_lines)
            else:
                planted += 1
                caught += any(value in line for line in flagged_lines)
    return {
        "filter": "detect-secrets scan_line (baseline)",
        "calls": len(costs),
        "p50_us": pct(costs, 50),
        "p99_us": pct(costs, 99),
        "mean_us": statistics.fmean(costs),
        "non_email_findings_per_clean_interaction": false_positives / max(1, clean),  # flagged lines
        "planted_caught": f"{caught}/{planted}",
    }


def _load_candidate(path: str) -> Callable[[str], Any]:
    spec = importlib.util.spec_from_file_location("privacy_candidate", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--candidate: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.redact


def report(result: dict[str, Any]) -> None:
    header = ("filter", "calls", "p50 µs", "p99 µs", "mean µs", "x faster than baseline", "FP/clean", "planted caught")
    base = result["baseline_mean_us"]
    rows = [
        (
            r["filter"],
            r["calls"],
            f"{r['p50_us']:.1f}",
            f"{r['p99_us']:.1f}",
            f"{r['mean_us']:.1f}",
            f"{base / r['mean_us']:.0f}",
            f"{r['non_email_findings_per_clean_interaction']:.2f}",
            r["planted_caught"],
        )
        for r in result["rows"]
    ]
    print_table(header, rows)
    print(
        f"\n{result['interactions']} interactions, mean {result['payload_bytes_mean']:.0f} bytes; "
        f"FP/clean: non-e-mail findings (detect-secrets: flagged lines) per interaction without planted data"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=400, help="interactions to build")
    parser.add_argument("--repeat", type=int, default=5, help="passes over them for the timings")
    parser.add_argument("--baseline-n", type=int, default=60, help="interactions for detect-secrets (~15 ms each)")
    parser.add_argument("--candidate", help="another privacy.py to time in the same run")
    args = parser.parse_args()

    from app.privacy import redact

    items = build_interactions(args.n)
    print(f"{len(items)} interactions; timing app.privacy ...", flush=True)
    rows = [bench_filter("kaizen app.privacy.redact", redact, items, args.repeat)]
    if args.candidate:
        print(f"timing candidate {args.candidate} ...", flush=True)
        rows.append(bench_filter(f"candidate {args.candidate}", _load_candidate(args.candidate), items, args.repeat))
    print("timing detect-secrets ...", flush=True)
    baseline = bench_detect_secrets(items, args.baseline_n)
    rows.append(baseline)
    result = {
        "name": "privacy",
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "args": vars(args),
        "interactions": len(items),
        "payload_bytes_mean": statistics.fmean(len(t) for t, _, _ in items),
        "rows": rows,
        "baseline_mean_us": baseline["mean_us"],
        "ratio_baseline_over_kaizen": baseline["mean_us"] / rows[0]["mean_us"],
    }
    report(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "privacy.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS / 'privacy.json'}")


if __name__ == "__main__":
    main()
