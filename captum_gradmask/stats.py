"""Summary statistics for per-image results.

Example::

    >>> from captum_gradmask.stats import bootstrap_ci
    >>> mean, low, high = bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=0)
    >>> mean, low <= mean <= high
    (2.5, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["bootstrap_ci"]

_BLOCK_VALUES = 4_000_000


def bootstrap_ci(
    values: Iterable[float | None],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean.

    Args:
        values: per-image values (``None`` and NaN are dropped).
        n_resamples: bootstrap resamples.
        confidence: interval coverage, in (0, 1).
        seed: seed of the resampling (a private generator: tables are reproducible and the
            global random state is left alone).

    Returns:
        ``(mean, low, high)``; ``low == high == mean`` for a single value, NaNs for none.
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"`n_resamples` must be a positive int, got {n_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence!r}")
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(data.mean())
    if data.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    # Resamples drawn in blocks of about 4 M values, so that thousands of images stay small.
    block = max(1, _BLOCK_VALUES // data.size)
    resampled = np.concatenate(
        [
            rng.choice(data, size=(min(block, n_resamples - start), data.size)).mean(axis=1)
            for start in range(0, n_resamples, block)
        ]
    )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return mean, float(low), float(high)
