"""Always-valid confidence sequences for comparing two arms of a canary.

The deployer looks at the live comparison after every few interactions and stops the moment the
evidence is clear. A fixed-sample confidence interval checked that often would exclude the truth
far more often than its nominal rate (every look is another chance to be fooled); a *confidence
sequence* holds at every look at once: with probability at least ``1 - alpha`` the true difference
is inside the interval at all sample sizes simultaneously (Howard, Ramdas, McAuliffe and Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist. 2021).

The boundary is their two-sided *normal mixture*: for a process ``S`` with variance process ``V``,
``|S| < sqrt((V + rho) * log((V + rho) / (rho * alpha**2)))`` at all times with probability
``1 - alpha`` (Ville's inequality on the mixture martingale). Here ``S`` is the information-scaled
difference of the two means, ``V`` its information (``1 / var``, with Welch's unpooled variance
``var_a / n_a + var_b / n_b`` estimated from the data, as in the asymptotic confidence sequences of
Waudby-Smith et al. 2023), so the interval is

    estimate ± se * sqrt((1 + rho / k) * log((k + rho) / (rho * alpha**2)))

where ``k`` is the effective number of observations (``n`` when both arms have ``n``) and ``rho``
is chosen so the boundary is tightest at ``k = n_opt`` (the deployer's minimum sample per arm:
where a decision first becomes possible). Early on the multiplier is large, and it grows like
``sqrt(log k)`` later: the price of looking at every step is about a factor 1.5-2 in width.

Every value compared here is in [0, 1] (quality scores, satisfaction, 0/1 outcomes). A plug-in
variance is the weak point of such a sequence at small samples: a canary arm that has seen a run of
equal values (ten accepted answers in a row) would claim a variance near zero and a narrow interval.
So each arm's variance is shrunk toward the variance of both arms pooled (``POOL_WEIGHT``
pseudo-observations: under "no difference" both arms share it, and the champion's large arm
estimates it well), the pooled one toward 1/4, the largest a [0, 1] variable can have
(``PRIOR_WEIGHT``), and nothing is concluded before each arm has ``MIN_PER_ARM`` observations. Both
pulls fade as ``1 / n``. Measured (tests/app/deployment/test_stats.py): over 1,000 looks at a 10 %
canary the false exclusion rate stays below ``alpha`` for continuous and 0/1 outcomes alike, where a
fixed-sample 95 % interval checked as often is wrong in a third to half of the runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_VARIANCE",
    "MIN_PER_ARM",
    "POOL_WEIGHT",
    "PRIOR_WEIGHT",
    "Count",
    "Interval",
    "Sample",
    "boundary_multiplier",
    "mean_difference",
    "mixture_rho",
    "proportion_difference",
]

MAX_VARIANCE = 0.25
"""The largest variance of a variable in [0, 1] (half its values at 0, half at 1)."""
PRIOR_WEIGHT = 1.0
"""Pseudo-observations of variance ``MAX_VARIANCE`` in the pooled variance."""
POOL_WEIGHT = 30.0
"""Pseudo-observations of the pooled variance in each arm's variance."""
MIN_PER_ARM = 5
"""Observations each arm needs before an interval is bounded."""


@dataclass(frozen=True)
class Sample:
    """Observations in [0, 1] summarised by their count, mean and sum of squared deviations
    (Welford's update: adding one value costs O(1) and never loses precision)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: Iterable[float]) -> Sample:
        sample = cls()
        for value in values:
            sample = sample.add(value)
        return sample

    def add(self, value: float) -> Sample:
        """This sample with one more observation.

        Raises:
            ValueError: ``value`` outside [0, 1] (or not a number).
        """
        x = float(value)
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"value {value!r} is outside [0, 1]; the comparison expects scores in [0, 1]")
        n = self.n + 1
        delta = x - self.mean
        mean = self.mean + delta / n
        return Sample(n, mean, self.m2 + delta * (x - mean))

    @property
    def sd(self) -> float:
        """The plain sample standard deviation (for reports; 0 below two observations)."""
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Sample:
        if not data:
            return cls()
        return cls(int(data["n"]), float(data["mean"]), float(data["m2"]))


@dataclass(frozen=True)
class Count:
    """Successes out of trials (an error rate, an acceptance rate)."""

    successes: int = 0
    n: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.successes <= self.n:
            raise ValueError(f"successes {self.successes} must be between 0 and n = {self.n}")

    @property
    def rate(self) -> float | None:
        return self.successes / self.n if self.n else None

    def as_sample(self) -> Sample:
        """The same outcomes as a :class:`Sample` of 0s and 1s."""
        if not self.n:
            return Sample()
        p = self.successes / self.n
        return Sample(self.n, p, self.n * p * (1 - p))

    def to_json(self) -> dict[str, Any]:
        return {"successes": self.successes, "n": self.n}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Count:
        if not data:
            return cls()
        return cls(int(data["successes"]), int(data["n"]))


@dataclass(frozen=True)
class Interval:
    """A confidence sequence's current interval for ``b - a`` (challenger minus champion).

    ``low`` and ``high`` are infinite while either arm has too few observations to say anything.
    """

    estimate: float
    low: float
    high: float
    n_a: int
    n_b: int

    @property
    def informative(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def to_json(self) -> dict[str, Any]:
        # JSON has no infinity (PostgreSQL's jsonb rejects it): an unbounded side is null.
        def bound(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "estimate": self.estimate,
            "low": bound(self.low),
            "high": bound(self.high),
            "n_a": self.n_a,
            "n_b": self.n_b,
        }

    def __str__(self) -> str:
        if not self.informative:
            return f"{self.estimate:+.3f} [unbounded: n {self.n_a}/{self.n_b}]"
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def mixture_rho(n_opt: float, alpha: float) -> float:
    """The normal mixture's parameter (in observations) that makes the two-sided boundary
    tightest at ``n_opt`` effective observations.

    Minimising ``(v + rho) log((v + rho) / (rho alpha^2))`` over ``rho`` at ``v = n_opt`` gives
    ``n_opt / rho = x`` with ``x = log(1 + x) - 2 log(alpha)``, solved here by fixed-point
    iteration (a contraction: it converges in a few steps).

    Raises:
        ValueError: ``n_opt`` not positive or ``alpha`` outside (0, 1).
    """
    _check_alpha(alpha)
    if not n_opt > 0:
        raise ValueError(f"n_opt must be positive, got {n_opt!r}")
    x = -2 * math.log(alpha)
    for _ in range(100):
        nxt = -2 * math.log(alpha) + math.log1p(x)
        if abs(nxt - x) < 1e-12:
            break
        x = nxt
    return n_opt / x


def boundary_multiplier(k: float, rho: float, alpha: float) -> float:
    """How many standard errors the confidence sequence extends on each side at ``k``
    effective observations (normal mixture with parameter ``rho``, two-sided, level ``alpha``)."""
    _check_alpha(alpha)
    if k <= 0:
        return math.inf
    return math.sqrt((1 + rho / k) * math.log((k + rho) / (rho * alpha**2)))


def mean_difference(a: Sample, b: Sample, *, alpha: float, n_opt: float) -> Interval:
    """Confidence sequence for ``mean(b) - mean(a)`` of two independent samples in [0, 1],
    valid over every sample size at once at level ``1 - alpha`` (normal mixture on Welch's
    variance with shrunk arm variances; see the module docstring). Unbounded until each arm has
    :data:`MIN_PER_ARM` observations."""
    rho = mixture_rho(n_opt, alpha)
    if a.n < MIN_PER_ARM or b.n < MIN_PER_ARM:
        return Interval(b.mean - a.mean if a.n and b.n else 0.0, -math.inf, math.inf, a.n, b.n)
    var_a, var_b = _arm_variances(a, b)
    se2 = var_a / a.n + var_b / b.n
    # Effective observations: the information 1/se2 in units of one observation per arm, so that
    # rho (tuned in observations) means the same whatever the variances are.
    k = (var_a + var_b) / se2
    half = math.sqrt(se2) * boundary_multiplier(k, rho, alpha)
    estimate = b.mean - a.mean
    return Interval(estimate, estimate - half, estimate + half, a.n, b.n)


def proportion_difference(a: Count, b: Count, *, alpha: float, n_opt: float) -> Interval:
    """Confidence sequence for ``rate(b) - rate(a)`` (e.g. the challenger's error rate minus the
    champion's): :func:`mean_difference` of the 0/1 outcomes."""
    return mean_difference(a.as_sample(), b.as_sample(), alpha=alpha, n_opt=n_opt)


def _arm_variances(a: Sample, b: Sample) -> tuple[float, float]:
    """Each arm's variance shrunk toward the pooled one, the pooled one toward MAX_VARIANCE."""
    n = a.n + b.n
    between = a.n * b.n / n * (a.mean - b.mean) ** 2  # the pooled sample's spread of the two means
    pooled = (a.m2 + b.m2 + between + PRIOR_WEIGHT * MAX_VARIANCE) / (n - 1 + PRIOR_WEIGHT)

    def shrunk(s: Sample) -> float:
        return (s.m2 + POOL_WEIGHT * pooled) / (s.n - 1 + POOL_WEIGHT)

    return shrunk(a), shrunk(b)


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
