"""Intervals and paired tests for the base-vs-tuned report (no scipy: small, exact where it can be, seeded).

- accuracies and rates (critical questions, stop rate): Wilson score interval for each model; exact McNemar test
  (two-sided binomial test with p = 1/2 on the discordant pairs) for base vs tuned on the same items;
- per-conversation metrics (perplexity, ROUGE): percentile bootstrap over conversations for each model; exact sign
  test on the per-conversation differences (ties dropped) for base vs tuned;
- every difference (tuned - base): paired percentile bootstrap, the same resampled items for both models.

The bootstrap draws its resamples from numpy's PCG64 seeded with base.seed, so a report is reproduced exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054  # standard normal 97.5 % quantile: two-sided 95 % intervals
LEVEL = 0.95


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Newcombe 1998, method 3)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials with p = 1/2: 2 x the smaller tail, capped at 1."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar_exact(base_correct: Sequence[bool], tuned_correct: Sequence[bool]) -> dict:
    """Exact McNemar test: among items where exactly one model is right, is 'tuned only' vs 'base only' 50/50?"""
    base_only = sum(1 for b, t in zip(base_correct, tuned_correct) if b and not t)
    tuned_only = sum(1 for b, t in zip(base_correct, tuned_correct) if t and not b)
    return {
        "base_only": base_only,
        "tuned_only": tuned_only,
        "p_value": binomial_two_sided_p(tuned_only, base_only + tuned_only),
    }


def sign_test(differences: Sequence[float]) -> dict:
    """Exact two-sided sign test of per-item differences oriented so that > 0 means tuned is better (higher ROUGE,
    higher log-probability per token); zero differences are dropped."""
    up = sum(1 for d in differences if d > 0)
    down = sum(1 for d in differences if d < 0)
    return {"tuned_better": up, "tuned_worse": down, "p_value": binomial_two_sided_p(up, up + down)}


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) indices drawn with replacement; the same array resamples both models (paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def _block(base: float, tuned: float, base_ci, tuned_ci, delta_ci, test: dict) -> dict:
    return {
        "base": base,
        "base_ci95_lo": base_ci[0],
        "base_ci95_hi": base_ci[1],
        "tuned": tuned,
        "tuned_ci95_lo": tuned_ci[0],
        "tuned_ci95_hi": tuned_ci[1],
        "delta": tuned - base,
        "delta_ci95_lo": delta_ci[0],
        "delta_ci95_hi": delta_ci[1],
        **test,
    }


def compare_proportions(base_hits: Sequence[bool], tuned_hits: Sequence[bool], indices: np.ndarray) -> dict:
    """Paired binary outcomes (right/wrong, stopped/not): Wilson per model, bootstrap difference, exact McNemar."""
    base, tuned = np.asarray(base_hits, dtype=float), np.asarray(tuned_hits, dtype=float)
    n = len(base)
    deltas = tuned[indices].mean(axis=1) - base[indices].mean(axis=1)
    return {
        "n": n,
        **_block(
            float(base.mean()),
            float(tuned.mean()),
            wilson_interval(int(base.sum()), n),
            wilson_interval(int(tuned.sum()), n),
            percentile_interval(deltas),
            mcnemar_exact(base_hits, tuned_hits),
        ),
    }


def compare_per_item(
    base_items: np.ndarray,
    tuned_items: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    differences: Sequence[float],
    indices: np.ndarray,
) -> dict:
    """A statistic of per-item values (mean ROUGE, pooled perplexity): bootstrap intervals, exact sign test.

    statistic maps resampled items (samples, n, ...) to one value per resample; differences (per item, > 0 where
    tuned is better) feed the sign test.
    """
    base_all, tuned_all = statistic(base_items[None]), statistic(tuned_items[None])
    base_boot, tuned_boot = statistic(base_items[indices]), statistic(tuned_items[indices])
    return {
        "n": len(base_items),
        **_block(
            float(base_all[0]),
            float(tuned_all[0]),
            percentile_interval(base_boot),
            percentile_interval(tuned_boot),
            percentile_interval(tuned_boot - base_boot),
            sign_test(differences),
        ),
    }


def mean_statistic(items: np.ndarray) -> np.ndarray:
    return items.mean(axis=-1)


def pooled_perplexity(items: np.ndarray) -> np.ndarray:
    """items (..., n, 2) of (sum of log-probabilities, token count) per conversation -> exp(-sum / tokens)."""
    return np.exp(-items[..., 0].sum(axis=-1) / items[..., 1].sum(axis=-1))
