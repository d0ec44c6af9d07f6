"""The deployer's decision rule on live traffic, pure (no store): the deployer runs it at every
tick, and the benchmark and the tests run it on evidence they build.

Each "significantly" is an always-valid confidence sequence of :mod:`app.deployment.stats` at
``deploy.alpha``, so looking at every tick does not inflate errors:

* **roll back** on a guardrail breach: the challenger's error rate above the champion's by more
  than ``deploy.max_error_rate``; its median latency above by more than
  ``deploy.max_latency_increase`` (once both arms have ``deploy.min_interactions_per_arm``); its
  quality score, users' satisfaction or acceptance significantly worse;
* **promote** when both arms have the minimum sample and the challenger is non-inferior (the
  quality difference's lower bound above ``-deploy.non_inferiority_margin``), or the users' own
  signals (satisfaction, acceptance) are significantly better on the challenger;
* the users outrank the scorer: while their signals favour the challenger significantly, a lower
  quality score is reported but is no reason to roll back (the scorer estimates what users say,
  and a real-time score is made before their feedback arrives);
* **hold** otherwise: inconclusive evidence never promotes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from app.config_sections import DeployConfig
from app.deployment.live import ArmEvidence, CanaryEvidence
from app.deployment.stats import Interval, mean_difference, proportion_difference

__all__ = ["Decision", "decide_canary", "decide_watch"]


@dataclass
class Decision:
    """What the rule says about a deployment now: the action, a stable code for the reason (a hold
    is recorded again when its code changes), the reason in words, and the evidence behind it."""

    action: Literal["promote", "rollback", "hold"]
    code: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


# --- the decision rule (pure: the benchmark and the tests run it without a store) ----------------


def decide_canary(evidence: CanaryEvidence, deploy: DeployConfig) -> Decision:
    """Promote, roll back or hold a running canary on its two arms' live evidence."""
    champion, challenger = evidence.champion, evidence.challenger
    intervals = _intervals(champion, challenger, deploy)
    record = {"arms": evidence.to_json(), "intervals": {k: v.to_json() for k, v in intervals.items()}}
    preferred = _users_prefer(intervals)
    breaches = _breaches(
        champion, challenger, intervals, deploy, quality_drop=0.0, signal_drop=0.0, scores_outranked=preferred
    )
    if breaches:
        return Decision("rollback", "guardrail", "; ".join(breaches), record)
    m = deploy.min_interactions_per_arm
    if champion.quality.n < m or challenger.quality.n < m:
        reason = (
            f"collecting: {challenger.quality.n} challenger and {champion.quality.n} champion scored interactions "
            f"of the {m} each arm needs (deploy.min_interactions_per_arm)"
        )
        return Decision("hold", "min_sample", reason, record)
    quality = intervals["quality"]
    if quality.low > -deploy.non_inferiority_margin:
        reason = (
            f"non-inferior: quality challenger - champion {quality} > -{deploy.non_inferiority_margin:g} "
            f"(deploy.non_inferiority_margin) at alpha {deploy.alpha:g}; users' signals not significantly worse; "
            f"challenger {challenger.summary()}; champion {champion.summary()}"
        )
        return Decision("promote", "non_inferior", reason, record)
    if preferred:
        reason = (
            f"the users prefer the challenger: {preferred}; the scorer's quality difference {quality} is outranked "
            f"by what the users did with the answers; challenger {challenger.summary()}; champion {champion.summary()}"
        )
        return Decision("promote", "users_prefer", reason, record)
    reason = (
        f"inconclusive: quality challenger - champion {quality}, not yet above "
        f"-{deploy.non_inferiority_margin:g} (deploy.non_inferiority_margin) nor significantly below 0"
    )
    return Decision("hold", "inconclusive", reason, record)


def decide_watch(baseline: ArmEvidence, current: ArmEvidence, deploy: DeployConfig) -> Decision:
    """Roll back a promoted champion whose live evidence dropped against the previous champion's
    baseline: quality or users' satisfaction significantly lower by more than ``deploy.watch_drop``
    of the baseline's, or an error-rate or latency guardrail breached; hold otherwise."""
    intervals = _intervals(baseline, current, deploy)
    record = {
        "baseline": baseline.to_json(),
        "current": current.to_json(),
        "intervals": {k: v.to_json() for k, v in intervals.items()},
    }
    breaches = _breaches(
        baseline,
        current,
        intervals,
        deploy,
        quality_drop=deploy.watch_drop * baseline.quality.mean,
        signal_drop=deploy.watch_drop * baseline.satisfaction.mean,
        acceptance_drop=deploy.watch_drop * (baseline.acceptance.rate or 0.0),
        scores_outranked=_users_prefer(intervals),
    )
    if breaches:
        return Decision("rollback", "dropped", "; ".join(breaches), record)
    if baseline.quality.n == 0:
        reason = "no baseline of the previous champion to compare with; watching errors and latency only"
        return Decision("hold", "no_baseline", reason, record)
    reason = f"watching: quality new - previous {intervals['quality']}; new {current.summary()}"
    return Decision("hold", "watching", reason, record)


def _intervals(base: ArmEvidence, new: ArmEvidence, deploy: DeployConfig) -> dict[str, Interval]:
    settings = {"alpha": deploy.alpha, "n_opt": deploy.min_interactions_per_arm}
    return {
        "quality": mean_difference(base.quality, new.quality, **settings),
        "satisfaction": mean_difference(base.satisfaction, new.satisfaction, **settings),
        "acceptance": proportion_difference(base.acceptance, new.acceptance, **settings),
        "error_rate": proportion_difference(base.errors, new.errors, **settings),
    }


def _users_prefer(intervals: Mapping[str, Interval]) -> str:
    """In words, where the users' own signals favour the new arm significantly (satisfaction or
    acceptance higher at the rule's alpha); empty when they do not."""
    better = [
        f"{label} higher by {intervals[name]}"
        for name, label in (("satisfaction", "satisfaction"), ("acceptance", "acceptance"))
        if intervals[name].low > 0
    ]
    return "; ".join(better)


def _breaches(
    base: ArmEvidence,
    new: ArmEvidence,
    intervals: Mapping[str, Interval],
    deploy: DeployConfig,
    *,
    quality_drop: float,
    signal_drop: float,
    acceptance_drop: float | None = None,
    scores_outranked: str = "",
) -> list[str]:
    """The guardrails ``new`` breaches against ``base``, in words (empty: none). A lower quality
    score is no breach while the users' own signals favour ``new`` (``scores_outranked``): the
    scorer estimates what the users say, and a real-time score is made before their feedback."""
    found = []
    errors = intervals["error_rate"]
    if errors.low > deploy.max_error_rate:
        found.append(
            f"error rate {new.errors.rate:.1%} ({new.failures} of {new.errors.n} requests failed) against "
            f"{base.errors.rate or 0:.1%}: higher by {errors} > {deploy.max_error_rate:g} (deploy.max_error_rate)"
        )
    m = deploy.min_interactions_per_arm
    if (
        base.latency_n >= m
        and new.latency_n >= m
        and base.latency_p50_ms
        and new.latency_p50_ms is not None
        and new.latency_p50_ms > base.latency_p50_ms * (1 + deploy.max_latency_increase)
    ):
        found.append(
            f"median latency {new.latency_p50_ms:.0f} ms against {base.latency_p50_ms:.0f} ms: more than "
            f"{deploy.max_latency_increase:.0%} higher (deploy.max_latency_increase)"
        )
    for name, label, drop in (
        *([] if scores_outranked else [("quality", "quality score", quality_drop)]),
        ("satisfaction", "users' satisfaction", signal_drop),
        ("acceptance", "acceptance rate", signal_drop if acceptance_drop is None else acceptance_drop),
    ):
        iv = intervals[name]
        if iv.high < -drop:
            bound = f"< -{drop:.3f}" if drop else "< 0"
            found.append(f"{label} significantly lower: difference {iv} {bound} at alpha {deploy.alpha:g}")
    return found
