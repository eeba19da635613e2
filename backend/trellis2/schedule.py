"""The flow sampler's time grid (reference `FlowEulerSampler.sample`, numerics.md §4 "Sampler")."""

from __future__ import annotations

import numpy as np


def flow_time_pairs(steps: int, rescale_t: float) -> list[tuple[float, float]]:
    """(t, t_prev) for each Euler step, from t = 1 (noise) down to 0.

    t runs over linspace(1, 0, steps + 1), warped by r·t / (1 + (r − 1)·t) (float64): r > 1 spends more
    steps near the noisy end.
    """
    t = np.linspace(1, 0, steps + 1)
    t = rescale_t * t / (1 + (rescale_t - 1) * t)
    seq = t.tolist()
    return [(seq[i], seq[i + 1]) for i in range(steps)]
