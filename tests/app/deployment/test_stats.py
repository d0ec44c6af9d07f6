"""The always-valid confidence sequences: their arithmetic, their coverage under repeated looks
(measured by simulation, against a fixed-sample interval that fails it), and their power."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from app.deployment.stats import (
    MIN_PER_ARM,
    Count,
    Interval,
    Sample,
    boundary_multiplier,
    mean_difference,
    mixture_rho,
    proportion_difference,
)

ALPHA = 0.05
N_OPT = 30


def test_sample_matches_the_textbook_mean_and_variance() -> None:
    rng = random.Random(1)
    values = [rng.random() for _ in range(200)]
    sample = Sample.of(values)
    assert sample.n == 200
    assert sample.mean == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert sample.sd == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert Sample.from_json(sample.to_json()) == sample
    with pytest.raises(ValueError, match="outside"):
        sample.add(1.5)


def test_count_checks_and_converts() -> None:
    count = Count(3, 10)
    assert count.rate == 0.3 and Count().rate is None
    assert count.as_sample().mean == pytest.approx(0.3)
    assert count.as_sample().sd == pytest.approx(statistics.stdev([1] * 3 + [0] * 7))
    assert Count.from_json(count.to_json()) == count
    with pytest.raises(ValueError, match="between 0 and n"):
        Count(4, 3)


def test_rho_makes_the_boundary_tightest_at_n_opt() -> None:
    rho = mixture_rho(N_OPT, ALPHA)

    def width(r: float) -> float:  # the boundary on the sum, at N_OPT observations
        return math.sqrt(N_OPT) * boundary_multiplier(N_OPT, r, ALPHA)

    assert width(rho) < width(rho * 1.2) and width(rho) < width(rho / 1.2)
    with pytest.raises(ValueError, match="alpha"):
        mixture_rho(N_OPT, 1.5)
    with pytest.raises(ValueError, match="n_opt"):
        mixture_rho(0, ALPHA)


def test_interval_is_unbounded_until_each_arm_has_a_few_observations() -> None:
    a = Sample.of([0.8] * 50)
    b = Sample.of([0.2] * (MIN_PER_ARM - 1))
    iv = mean_difference(a, b, alpha=ALPHA, n_opt=N_OPT)
    assert not iv.informative and iv.estimate == pytest.approx(-0.6)
    assert iv.to_json()["low"] is None and iv.to_json()["high"] is None  # JSON (and jsonb) have no infinity
    iv = mean_difference(a, b.add(0.2), alpha=ALPHA, n_opt=N_OPT)
    assert iv.informative and iv.high < 0


def test_interval_narrows_with_data_and_is_wider_than_a_fixed_sample_one() -> None:
    rng = random.Random(2)
    widths = []
    for n in (30, 300, 3000):
        a = Sample.of(rng.betavariate(5.6, 2.4) for _ in range(n))
        b = Sample.of(rng.betavariate(5.6, 2.4) for _ in range(n))
        iv = mean_difference(a, b, alpha=ALPHA, n_opt=N_OPT)
        widths.append(iv.high - iv.low)
        fixed = 2 * 1.96 * math.sqrt(a.sd**2 / n + b.sd**2 / n)
        assert iv.high - iv.low > fixed  # the price of looking at every step
    assert widths[0] > widths[1] > widths[2]


def _stream(rng: random.Random, draw, share: float, looks: int):
    """Yield both arms after every interaction of a canary with ``share`` on arm b."""
    a, b = Sample(), Sample()
    for _ in range(looks):
        if rng.random() < share:
            b = b.add(draw())
        else:
            a = a.add(draw())
        yield a, b


def _fixed_sample_interval(a: Sample, b: Sample) -> Interval:
    if a.n < MIN_PER_ARM or b.n < MIN_PER_ARM:
        return Interval(0.0, -math.inf, math.inf, a.n, b.n)
    half = 1.96 * math.sqrt(a.sd**2 / a.n + b.sd**2 / b.n)
    return Interval(b.mean - a.mean, b.mean - a.mean - half, b.mean - a.mean + half, a.n, b.n)


@pytest.mark.parametrize(
    ("name", "draw_of"),
    [
        ("quality scores", lambda rng: lambda: rng.betavariate(5.6, 2.4)),  # mean 0.7, sd 0.15
        ("accepted or not", lambda rng: lambda: float(rng.random() < 0.9)),  # 0/1, long runs of 1s
    ],
)
def test_false_exclusion_over_every_look_stays_below_alpha(name: str, draw_of) -> None:
    """A/A: both arms draw from one distribution and the interval is checked after each of 1,000
    interactions of a 10 % canary; the share of runs in which it ever excludes the true difference
    (0) stays below alpha, while a fixed-sample 95 % interval checked the same way fails far more."""
    rng = random.Random(7)
    runs, looks = 150, 1000
    ours = fixed = 0
    for _ in range(runs):
        excluded_ours = excluded_fixed = False
        for a, b in _stream(rng, draw_of(rng), 0.1, looks):
            if not excluded_ours:
                iv = mean_difference(a, b, alpha=ALPHA, n_opt=N_OPT)
                excluded_ours = iv.low > 0 or iv.high < 0
            if not excluded_fixed:
                iv = _fixed_sample_interval(a, b)
                excluded_fixed = iv.low > 0 or iv.high < 0
            if excluded_ours and excluded_fixed:
                break
        ours += excluded_ours
        fixed += excluded_fixed
    assert ours / runs <= ALPHA, f"{name}: {ours}/{runs} runs excluded the truth"
    assert fixed / runs >= 3 * ALPHA, f"{name}: the fixed-sample interval excluded only {fixed}/{runs}"


def test_proportion_difference_under_the_null_and_against_a_failing_arm() -> None:
    """Error rates: an A/A canary at a 10 % error rate never shows one arm more than 5 points worse
    (the guardrail), and an arm that fails every request is past it after a handful of requests."""
    rng = random.Random(11)
    for _ in range(100):
        a, b = [0, 0], [0, 0]
        for _ in range(1000):
            arm = b if rng.random() < 0.1 else a
            arm[0] += rng.random() < 0.1
            arm[1] += 1
            assert proportion_difference(Count(*a), Count(*b), alpha=ALPHA, n_opt=N_OPT).low <= 0.05
    ok = Count(0, 60)
    assert proportion_difference(ok, Count(MIN_PER_ARM, MIN_PER_ARM), alpha=ALPHA, n_opt=N_OPT).low > 0.05


def test_a_real_difference_is_detected() -> None:
    """At a 10 % canary, a challenger whose quality is 30 % lower (0.49 against 0.70) is shown
    significantly worse within 200 of its interactions in every run, and one 10 % lower in all runs
    within 1,000; the true difference stays inside the interval meanwhile."""
    rng = random.Random(3)

    def beta(mean: float):
        return lambda: rng.betavariate(8 * mean, 8 * (1 - mean))

    for drop, limit in ((0.3, 200), (0.1, 1000)):
        worse = 0.7 * (1 - drop)
        needed = []
        for _ in range(40):
            a, b = Sample(), Sample()
            draw_a, draw_b = beta(0.7), beta(worse)
            while b.n < 5000:
                if rng.random() < 0.1:
                    b = b.add(draw_b())
                else:
                    a = a.add(draw_a())
                iv = mean_difference(a, b, alpha=ALPHA, n_opt=N_OPT)
                if iv.high < 0:
                    assert iv.low < worse - 0.7 < iv.high
                    needed.append(b.n)
                    break
        assert len(needed) == 40 and max(needed) <= limit, (drop, sorted(needed))
