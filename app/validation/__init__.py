"""Validation of a candidate adapter against its baseline (the champion, or the base model while
there is none), both measured in one run on the same hardware, and the verdict of the decision
matrix. ``jobs/validate.py`` is the recipe; the suites live here:

====================  ============================================================================
``inputs``            the two models (:func:`~app.validation.inputs.choose_subjects`) and the sets:
                      the candidate's own validation split, the earlier domains of the champion's
                      lineage (:class:`~app.validation.inputs.EvalSet`)
``measure``           both models answer every prompt, interleaved; latency, throughput, memory
``performance``       accuracy (exact, executed, or the scorer's similarity to the reference),
                      latency percentiles, tokens per second
``quality``           the five-dimension scorer on both models' answers: paired difference and
                      its confidence interval, win rate
``safety``            planted secrets and privacy leaks, insecure code, harmful requests (the
                      shipped sets in ``data/``)
``forgetting``        accuracy on every earlier domain; the forgetting rate per domain
``verdict``           :func:`~app.validation.verdict.decide`: production, staging or rejected
``run``               the measuring half as its Ray task runs it
                      (:func:`~app.validation.run.collect_evidence`)
``report``            ``report.json`` and ``report.md`` as a ``validation`` artifact; the verdict
                      recorded in the store and the registry status moved
====================  ============================================================================
"""

from app.validation.inputs import EvalCase, EvalSet, NothingToValidate, Subjects
from app.validation.run import Collected, ValidationPlan, collect_evidence
from app.validation.verdict import Criterion, Decision, Evidence, decide

__all__ = [
    "Collected",
    "Criterion",
    "Decision",
    "EvalCase",
    "EvalSet",
    "Evidence",
    "NothingToValidate",
    "Subjects",
    "ValidationPlan",
    "collect_evidence",
    "decide",
]
