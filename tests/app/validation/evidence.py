"""What the validation tests share: evidence built from chosen numbers (no model), and a
:class:`~app.validation.run.Collected` around it for the report's tests."""

from __future__ import annotations

from collections.abc import Sequence

from app.validation.forgetting import DomainForgetting, ForgettingEvidence
from app.validation.inputs import EvalCase, EvalSet
from app.validation.measure import Answer, Measurements, MemoryUse, Pair, SetAnswers, Throughput
from app.validation.performance import PerformanceEvidence, RowResult
from app.validation.quality import QualityEvidence
from app.validation.run import Collected
from app.validation.safety import HarmfulEvidence, InsecureCodeEvidence, LeakageEvidence, SafetyEvidence
from app.validation.verdict import Evidence

MIB = 2**20


def make_evidence(
    *,
    accuracy: tuple[float, float] = (0.8, 0.8),
    latency_ms: tuple[float, float] = (100.0, 100.0),
    memory_mib: tuple[float, float] = (100.0, 100.0),
    planted: tuple[int, int] = (0, 0),
    sensitive: tuple[int, int] = (0, 0),
    insecure: tuple[int, int] = (0, 0),
    harmful: tuple[int, int] = (0, 0),
    domains: Sequence[tuple[str, float, float]] = (),
) -> Evidence:
    """Evidence with these measurements (candidate, baseline); ``domains``: (name, before, after)."""
    memory = [MemoryUse(int(m * MIB), 0, 0) for m in memory_mib]
    return Evidence(
        performance=PerformanceEvidence(
            rows=10,
            accuracy=Pair(*accuracy),
            methods={"exact": 10},
            latency_p50_ms=Pair(*latency_ms),
            latency_p99_ms=Pair(latency_ms[0] * 2, latency_ms[1] * 2),
            tokens_per_s=Pair(50.0, 50.0),
            requests=40,
            throughput=(Throughput(1, 10, 5.0, 5.0, 50.0, 50.0),),
            candidate_memory=memory[0],
            baseline_memory=memory[1],
            memory_method="chosen by the test",
            device="cpu",
        ),
        quality=QualityEvidence(
            pairs=10,
            mean=Pair(0.7, 0.6),
            mean_difference=0.1,
            interval=(0.05, 0.15),
            confidence=0.95,
            wins=7,
            ties=1,
            losses=2,
            dimensions={"efficiency": Pair(1.0, float("nan"))},
        ),
        safety=SafetyEvidence(
            leakage=LeakageEvidence(10, Pair(*planted), 40, Pair(*sensitive), {}, {}, ()),
            insecure_code=InsecureCodeEvidence(16, Pair(*insecure), Pair(16, 16), {}, {}),
            # Each request answered beyond the baseline's count is one the baseline refused.
            harmful=HarmfulEvidence(
                12, Pair(*harmful), (), tuple(f"h{i}" for i in range(max(0, harmful[0] - harmful[1])))
            ),
        ),
        forgetting=ForgettingEvidence(
            tuple(DomainForgetting(name, f"/data/{name}", 8, before, after) for name, before, after in domains)
        ),
    )


def make_collected(evidence: Evidence) -> tuple[Collected, tuple[EvalSet, ...]]:
    """A run around ``evidence``: one own set of two rows answered by both arms."""
    own = EvalSet(
        "ds-own",
        "own",
        "/data/ds-own/validation.parquet",
        (
            EvalCase("r1", ({"role": "user", "content": "hi"},), "hello"),
            EvalCase("r2", ({"role": "user", "content": "bye"},), "goodbye"),
        ),
        rows_read=2,
    )
    answers = SetAnswers(
        "ds-own",
        (Answer("hello", 10.0, 2, "stop"), Answer("ciao | bye", 12.0, 3, "stop")),
        (Answer("", 11.0, 8, "length"), Answer("bye", 9.0, 2, "stop")),
    )
    measurements = Measurements(
        device="cpu",
        torch_threads=1,
        answers=(answers,),
        throughput=evidence.performance.throughput,
        candidate_memory=evidence.performance.candidate_memory,
        baseline_memory=evidence.performance.baseline_memory,
        memory_method="chosen by the test",
        seconds=1.5,
    )
    rows = (
        RowResult("ds-own", "r1", "exact", "similarity", 1.0, 0.0, "hello", ""),
        RowResult("ds-own", "r2", "similarity", "similarity", 0.2, 0.9, "ciao | bye", "bye"),
    )
    return Collected(evidence, rows, measurements), (own,)
