"""Robust z-scores: a median and a scaled median absolute deviation, so that the outlier being
looked for cannot hide by inflating the spread it is measured against."""

from __future__ import annotations

import numpy as np

MAD_SCALE = 1.4826   # makes the MAD a consistent estimator of a normal standard deviation


def robust_z(values, base=None, *, floor: float = 1e-12) -> np.ndarray:
    """z of ``values`` against the median and MAD of ``base`` (default: ``values`` themselves).
    ``floor`` bounds the MAD away from 0 (identical siblings would otherwise give infinities)."""
    v = np.asarray(values, dtype=np.float64)
    b = v if base is None else np.asarray(base, dtype=np.float64)
    med = np.median(b)
    mad = np.median(np.abs(b - med)) * MAD_SCALE
    return (v - med) / max(mad, floor)
