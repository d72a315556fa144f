"""``drift`` against the *best-fitting* benign topic mix, tried in place of the monitor's nearest-topic
shares (``routing_monitor_horizon.py``, ``routing_monitor_variants.py --variants drift,fitted``;
docs/routing-security.md says why the monitor keeps the nearest-topic shares).

The monitor's ``drift`` measures a window against the topics' references mixed in the shares of
the window's requests nearest each topic. Where a narrow topic sits inside a broad one, most of the
broad topic's requests are nearer the narrow one, and the mix is one no benign user sent: a bias
no window length removes. Here the mix is instead ``argmin_c c'Kc - 2 c'm`` over the simplex
(``m``: the window's mean kernel to each topic), the benign mix the window is closest to.
"""

from __future__ import annotations

import numpy as np

from moeguard.monitor.slices import fit   # the active-set solver (`mix`) moved into the monitor


def fitted_drift(kernel, x: np.ndarray) -> float:
    """A window's [n, dim] squared MMD from the best-fitting mix of ``kernel``'s topics (never above
    the nearest-topic shares' value): ``slices.fit``'s."""
    return fit(kernel, x)[0]
