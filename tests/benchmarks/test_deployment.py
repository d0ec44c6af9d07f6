"""The deployment benchmark's simulated canaries: the deployer's rule against the fixed-duration
baseline on the same draws."""

from __future__ import annotations

import random

from app.config_sections import DeployConfig
from benchmarks.deployment import FIXED_CANARY_CHALLENGER, simulate, summarize

# Scores shaped like the scorer's: most answers good, a quarter poor.
POOL = [0.85, 0.9, 0.8, 0.75, 0.95, 0.7, 0.2, 0.15]


def test_a_much_worse_challenger_is_rolled_back_early_and_the_fixed_canary_waits_for_its_look() -> None:
    deploy = DeployConfig()
    outcomes = [simulate(POOL, 0.3, deploy, random.Random(i), look_every=10, max_interactions=6000) for i in range(20)]
    sequential = summarize([s for s, _ in outcomes])
    fixed = summarize([f for _, f in outcomes])
    assert sequential["rollback_share"] == 1.0 and sequential["promote_share"] == 0.0
    assert sequential["challenger_n_to_rollback_p95"] < FIXED_CANARY_CHALLENGER
    assert fixed["rollback_share"] == 1.0 and fixed["challenger_n_to_rollback_median"] == FIXED_CANARY_CHALLENGER


def test_equal_arms_are_promoted_by_the_rule_and_split_by_the_mean_only_baseline() -> None:
    deploy = DeployConfig()
    outcomes = [simulate(POOL, 0.0, deploy, random.Random(i), look_every=10, max_interactions=40000) for i in range(20)]
    sequential = summarize([s for s, _ in outcomes])
    fixed = summarize([f for _, f in outcomes])
    assert sequential["rollback_share"] <= 0.05 and sequential["promote_share"] >= 0.9
    assert 0.2 <= fixed["rollback_share"] <= 0.8  # a coin toss: the baseline's weakness
