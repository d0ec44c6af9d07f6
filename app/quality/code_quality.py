"""Code quality of the Python in responses, from real analysers, with the seed's weights:
style 0.30 (ruff's rules), maintainability 0.30 (radon: maintainability index, cyclomatic
complexity, function length; duplicated lines), security 0.25 (bandit's checks), performance
0.15 (AST smells: deep loop nests, string building in loops, linear searches in loops).

Radon and bandit run in process. Ruff is a binary, so it runs once per batch over every block of
every response in it (:func:`assess_code_quality_batch`), never once per interaction.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from radon.complexity import cc_visit
from radon.metrics import mi_visit

from app.quality.base import DimensionScore, clamp, weighted
from app.quality.code import check_python, extract_code_blocks

__all__ = ["RUFF_RULES", "assess_code_quality", "assess_code_quality_batch"]

RUFF_RULES = "E,W,F,B,N,UP,SIM,C4"
_SEVERITY_COST = {"HIGH": 0.5, "MEDIUM": 0.25, "LOW": 0.1}


@functools.cache
def _ruff_binary() -> str:
    """The ruff executable the ruff wheel installed: run directly, not through ``python -m ruff``,
    which starts a Python interpreter (~45 ms) only to exec it."""
    try:
        from ruff.__main__ import find_ruff_bin

        return str(find_ruff_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("ruff") or "ruff"


def _ruff(files: list[Path], root: Path) -> dict[str, int]:
    """Violations per file, from one ruff run over them all."""
    if not files:
        return {}
    cmd = [
        _ruff_binary(),
        "check",
        "--isolated",
        "--no-cache",
        "--exit-zero",
        "--output-format=json",
        f"--select={RUFF_RULES}",
        "--line-length=120",
        str(root),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    counts: Counter[str] = Counter(Path(item["filename"]).name for item in json.loads(out or "[]"))
    return {f.name: counts.get(f.name, 0) for f in files}


# bandit checks whose findings are injection risks: a shell, eval/exec, SQL built from strings.
INJECTION_TESTS = frozenset({"B102", "B307", "B602", "B604", "B605", "B609", "B608"})


def _bandit(path: Path) -> list[tuple[str, str]]:
    """(severity, test id) of bandit's findings in one file."""
    from bandit.core import config, manager

    # bandit loads every output formatter through stevedore, which logs an ERROR for the optional
    # SARIF one it cannot import; we use none of them.
    logging.getLogger("stevedore.extension").setLevel(logging.CRITICAL)
    mgr = manager.BanditManager(config.BanditConfig(), "file", quiet=True)
    mgr.discover_files([str(path)])
    mgr.run_tests()
    return [(str(issue.severity), str(issue.test_id)) for issue in mgr.get_issue_list()]


def _maintainability(code: str, tree: ast.Module) -> dict[str, float]:
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lengths = [(n.end_lineno or n.lineno) - n.lineno + 1 for n in functions]
    complexities = [b.complexity for b in cc_visit(code)]
    lines = [line.strip() for line in code.splitlines() if len(line.strip()) >= 12]
    repeated = sum(n - 1 for n in Counter(lines).values() if n > 1)
    parts = {
        "maintainability_index": clamp(mi_visit(code, multi=True) / 100.0),
        "function_length": sum(n <= 50 for n in lengths) / len(lengths) if lengths else 1.0,
        "complexity": 1.0 - clamp((sum(complexities) / len(complexities) - 1.0) / 14.0) if complexities else 1.0,
        "duplication": 1.0 - (repeated / len(lines) if lines else 0.0),
    }
    return parts


def _loop_depth(node: ast.AST, depth: int = 0) -> int:
    here = depth + isinstance(node, (ast.For, ast.While, ast.AsyncFor, ast.comprehension))
    return max([here] + [_loop_depth(child, here) for child in ast.iter_child_nodes(node)])


def _performance(tree: ast.Module) -> tuple[float, list[str]]:
    smells = []
    if _loop_depth(tree) >= 3:
        smells.append("loops nested three deep")
    for loop in (n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))):
        for node in ast.walk(loop):
            if (
                isinstance(node, ast.AugAssign)
                and isinstance(node.op, ast.Add)
                and isinstance(node.value, (ast.JoinedStr, ast.Constant))
                and isinstance(getattr(node.value, "value", ""), str)
            ):
                smells.append("string built with += in a loop")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("index", "count", "remove")
            ):
                smells.append(f"linear .{node.func.attr}() inside a loop")
    unique = sorted(set(smells))
    return clamp(1.0 - 0.3 * len(unique)), unique


def assess_code_quality_batch(responses: Sequence[str]) -> list[DimensionScore | None]:
    """Code quality of each response's Python blocks; None where a response has none that parse."""
    results: list[DimensionScore | None] = [None] * len(responses)
    with tempfile.TemporaryDirectory(prefix="kaizen-quality-") as tmp:
        root = Path(tmp)
        per_response: dict[int, list[tuple[Path, str, ast.Module]]] = {}
        for i, response in enumerate(responses):
            for j, block in enumerate(b for b in extract_code_blocks(response) if b.language == "python"):
                check = check_python(block.code)
                if check.parses and check.tree is not None:
                    path = root / f"r{i}_b{j}.py"
                    path.write_text(block.code)
                    per_response.setdefault(i, []).append((path, block.code, check.tree))
        violations = _ruff([p for items in per_response.values() for p, _, _ in items], root)
        for i, items in per_response.items():
            lines = sum(max(1, len(code.splitlines())) for _, code, _ in items)
            v = sum(violations.get(p.name, 0) for p, _, _ in items)
            style = clamp(1.0 - 4.0 * v / lines)
            maint = [_maintainability(code, tree) for _, code, tree in items]
            maint_parts = {k: sum(m[k] for m in maint) / len(maint) for k in maint[0]}
            maintainability = sum(maint_parts.values()) / len(maint_parts)
            findings = [f for p, _, _ in items for f in _bandit(p)]
            severities = [severity for severity, _ in findings]
            security = clamp(1.0 - sum(_SEVERITY_COST.get(s, 0.1) for s in severities))
            perf = [_performance(tree) for _, _, tree in items]
            performance = min(score for score, _ in perf)
            result = weighted(
                {
                    "style": (0.30, style),
                    "maintainability": (0.30, maintainability),
                    "security": (0.25, security),
                    "performance": (0.15, performance),
                }
            )
            assert result is not None
            score, subscores = result
            results[i] = DimensionScore(
                "code_quality",
                score,
                subscores,
                {
                    "ruff_violations": v,
                    "lines": lines,
                    "bandit": dict(Counter(severities)),
                    "injection": sorted({t for _, t in findings if t in INJECTION_TESTS}),
                    "maintainability": maint_parts,
                    "smells": sorted({s for _, found in perf for s in found}),
                },
            )
    return results


def assess_code_quality(response: str) -> DimensionScore | None:
    """Code quality of one response (a batch of one)."""
    return assess_code_quality_batch([response])[0]
