"""The comparison metrics of the Align-Pro paper: mean reward, reward variance, and win rate.

For an arm A and a baseline B scored on the same n held-out prompts (paired by prompt):

    mean(A)      = 1/n Σ_i r_A,i
    variance(A)  = 1/(n-1) Σ_i (r_A,i - mean(A))²          (0 when n < 2)
    win_rate(A,B)= 1/n Σ_i ( [r_A,i > r_B,i] + ½·[r_A,i = r_B,i] )

Ties count half, so two identical arms have a win rate of exactly 0.5. The interval printed beside a
win rate is a 95% Wilson score interval over the n paired prompts, with the sample size corrected for ties.
The per-prompt score s_i ∈ {1, ½, 0} has variance p(1-p) when there are no ties and less with them (a tie is
½ whichever arm is better), and the Wilson interval assumes p(1-p); so it is taken at the effective size

    n_eff = max(n, n · p(1-p) / σ̃²),
    σ̃² = the variance of the scores with one more win and one more loss (W+1, T, L+1 over n+2)

The pseudo win and loss (as in Agresti-Caffo intervals) keep a sample with few or no decisive pairs from
claiming near-zero variance: from the observed variance alone, an arm that won 1 of 50 prompts and tied the
rest got an interval covering the truth 63% of the time. Simulated coverage (4000 draws each): 94-96% with
30-62% wins and 0-60% ties at n = 50 and 250; 100% when wins are rare (2% of 50, 0.4% of 250) where the
interval is still a quarter of the uncorrected one. Without ties it is Wilson's interval itself. The
uncorrected interval (Wilson on wins + ties/2 over n) covered 98.6-99.8% with ties, too wide: 0.44-0.56 for
an arm tied with the baseline on all 250 prompts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from alignfast.ops._checks import fail

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class ArmSummary:
    """One row of the comparison table. win_* are None for the baseline itself."""

    name: str
    n: int
    mean: float
    variance: float
    win_rate: float | None = None
    win_rate_low: float | None = None
    win_rate_high: float | None = None
    wins: int | None = None
    ties: int | None = None
    losses: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _finite_scores(name: str, scores: Sequence[float]) -> list[float]:
    values = [float(s) for s in scores]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        fail(name, f"holds a non-finite reward at index {bad[0]} ({values[bad[0]]})")
    return values


def mean_and_variance(scores: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased sample variance (0 for fewer than two scores); (nan, nan) for none."""
    values = _finite_scores("scores", scores)
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.fsum((v - mean) ** 2 for v in values) / (n - 1)


def wilson_interval(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes/n (successes may be fractional: ties count ½)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate_interval(wins: int, ties: int, losses: int, z: float = Z_95) -> tuple[float, float]:
    """The tie-corrected Wilson interval of the win rate (module docstring): Wilson at n_eff."""
    n = wins + ties + losses
    if n == 0:
        return math.nan, math.nan
    p = (wins + 0.5 * ties) / n
    w, l, m = wins + 1, losses + 1, n + 2  # one pseudo win and one pseudo loss: never a zero variance
    q = (w + 0.5 * ties) / m
    var = (w * (1 - q) ** 2 + ties * (0.5 - q) ** 2 + l * q ** 2) / m
    n_eff = max(n, n * p * (1 - p) / var)  # p in {0, 1} (no ties either way): Wilson at n
    return wilson_interval(p * n_eff, n_eff, z)


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> tuple[float, int, int, int]:
    """(win rate with ties counted half, wins, ties, losses) of `scores` against `baseline`, paired."""
    a = _finite_scores("scores", scores)
    b = _finite_scores("baseline", baseline)
    if len(a) != len(b):
        fail("baseline", f"has {len(b)} scores but the arm has {len(a)}; win rates pair scores by prompt")
    if not a:
        return math.nan, 0, 0, 0
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    losses = len(a) - wins - ties
    return (wins + 0.5 * ties) / len(a), wins, ties, losses


def compare_arms(arms: Mapping[str, Sequence[float]], baseline: str) -> list[ArmSummary]:
    """One summary per arm, in the given order; win rates are against `baseline` (which must be an arm)."""
    if baseline not in arms:
        fail("baseline", f"must name one of the arms {list(arms)}, got {baseline!r}")
    base_scores = arms[baseline]
    rows = []
    for name, scores in arms.items():
        mean, variance = mean_and_variance(scores)
        if name == baseline:
            rows.append(ArmSummary(name, len(scores), mean, variance))
            continue
        rate, wins, ties, losses = win_rate(scores, base_scores)
        low, high = win_rate_interval(wins, ties, losses)
        rows.append(ArmSummary(name, len(scores), mean, variance, rate, low, high, wins, ties, losses))
    return rows
