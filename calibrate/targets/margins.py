"""A target's published margin of error as a relative standard error, and the error that sampling
noise alone puts between a published figure and the truth.

The ACS publishes every estimate with a margin of error (``moe``, at ``moe_confidence``, 90 %);
``moe / z(confidence) / |value|`` is the relative SE of the published figure. Even the true
population values miss the published figures by that noise, so a held-out target independent
of the fitted ones cannot be expected closer than :func:`published_noise_quantile` says, and a
training error far below it is the fit following the survey's noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def relative_standard_errors(targets: pd.DataFrame, default: float = 0.02, minimum: float = 0.002) -> np.ndarray:
    """Per target: published margin of error / z(confidence) / |value|, floored at ``minimum``;
    ``default`` where the target has no margin (or no confidence level, or a zero value)."""
    from scipy.special import ndtri

    n = len(targets)
    moe = targets["moe"].to_numpy(dtype=np.float64) if "moe" in targets else np.full(n, np.nan)
    conf = targets["moe_confidence"].to_numpy(dtype=np.float64) if "moe_confidence" in targets else np.full(n, np.nan)
    value = np.abs(targets["value"].to_numpy(dtype=np.float64))
    known = np.isfinite(moe) & (moe >= 0) & np.isfinite(conf) & (conf > 0) & (conf < 1) & (value > 0)
    z = ndtri(0.5 + np.where(known, conf, 0.5) / 2)
    rel = np.divide(moe, z * value, out=np.full(n, np.nan), where=known)
    return np.where(known, np.maximum(rel, minimum), default)


def published_noise_quantile(relative_se: np.ndarray, q: float) -> float:
    """The q-quantile of |published - true| / |true| over targets with these relative SEs (NaN: no
    margin, left out): what an estimator that knew every true value would score against the
    published figures (a mixture of half-normals, one per target)."""
    from scipy.optimize import brentq
    from scipy.special import ndtr

    s = np.asarray(relative_se, dtype=np.float64)
    s = s[np.isfinite(s) & (s > 0)]
    if s.size == 0 or not 0.0 < q < 1.0:
        raise ValueError(f"need positive relative SEs and 0 < q < 1 (got {s.size} SEs, q={q})")

    def below(x: float) -> float:  # share of the mixture's |error| at most x, minus q
        return float(np.mean(2.0 * ndtr(x / s) - 1.0)) - q

    return float(brentq(below, 0.0, 10.0 * float(s.max()), xtol=1e-12))
