"""Would another window statistic catch the extraction streams that ``drift`` misses? Each variant
replaces ``KernelReference.drift`` (calibration windows and test windows alike) and runs
``routing_monitor.py`` unchanged, in its own process; the recorded statistic runs in the same
session, side by side.

    .venv/bin/python benchmarks/routing_monitor_variants.py [--variants drift,spread,narrow] [--out JSON]

- ``drift``: the monitor's statistic, the squared MMD of a window against benign references of its
  topic mix (median-heuristic bandwidth);
- ``spread``: one-sided dispersion, ``c'Kc - mean_{i != j} k(x_i, x_j)``: positive when a window's
  prompts are more spread out than benign users of the same topics (what a k-center coreset
  selection should look like);
- ``narrow``: the MMD with a quarter of the bandwidth (more weight on local structure);
- ``fitted``: the MMD against the best-fitting mix of benign topics, not the nearest-topic shares
  (``_fitted_mix.py``).

Reported per variant and attack type: the window AUROC of the statistic alone and of the combined
p-value, and the false-positive rate at 90% detection; per variant, the share of benign windows
alerting at 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import write_result

HERE = Path(__file__).resolve().parent
_DRIFT = None   # the monitor's own statistic, kept before the patch
ATTACKS = ("extraction", "extraction-coreset", "extraction-entropy", "hijack", "random", "saturation")


def _spread(self, x):
    mu = self.means(x)
    n = len(x)
    c = np.bincount(mu.argmax(1), minlength=len(self.refs)) / n
    kx = self._k(x, x)
    within = (kx.sum() - np.trace(kx)) / max(1, n * (n - 1))
    return float(c @ self.K @ c - within)


def _narrow(self, x):
    from moeguard.monitor.embed import KernelReference

    if not hasattr(self, "_narrow"):   # the same references, a quarter of the bandwidth (and its own K)
        self._narrow = KernelReference(refs=dict(zip(self.names, self.refs)), bandwidth=self.bandwidth / 4)
    return _DRIFT(self._narrow, x)


def child(variant: str, out: str) -> None:
    """Patch the statistic, then run the benchmark as its own command would."""
    import runpy

    from moeguard.monitor import embed

    from _fitted_mix import fitted_drift

    global _DRIFT
    _DRIFT = embed.KernelReference.drift
    if variant != "drift":
        embed.KernelReference.drift = {"spread": _spread, "narrow": _narrow, "fitted": fitted_drift}[variant]
    sys.argv = ["routing_monitor.py", "--out", out]
    runpy.run_path(str(HERE / "routing_monitor.py"), run_name="__main__")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="drift,spread,narrow")
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - {"drift", "spread", "narrow", "fitted"})
    if unknown:
        sys.exit(f"routing_monitor_variants.py: unknown variants {unknown}; expected drift, spread, narrow, fitted")
    results, seconds, benign = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:       # one at a time: two torch jobs on 2 cores slow each other
            began = time.perf_counter()
            out = os.path.join(tmp, f"{v}.json")
            subprocess.run([sys.executable, __file__, "--child", v, out], check=True, stdout=subprocess.DEVNULL)
            seconds[v] = round(time.perf_counter() - began, 1)
            w = json.loads(Path(out).read_text())["results"]["per_window"]
            results[v] = {a: {"statistic_auroc": w[a]["auroc_by_statistic"]["drift"], "combined_auroc": w[a]["auroc"],
                              "fpr_at_90pct_detection": w[a]["fpr_at_90pct_detection"]} for a in ATTACKS}
            benign[v] = w["benign_alert_rate_at_0.01"]
    for a in ATTACKS:
        print(f"{a:20s} " + "  ".join(f"{v}: {results[v][a]['statistic_auroc']:.3f}/{results[v][a]['combined_auroc']:.3f}"
                                      for v in variants))
    print("benign windows alerting at 0.01: " + "  ".join(f"{v}: {benign[v]:.3f}" for v in variants))
    path = write_result("routing_monitor_variants", {"variants": variants, "per_window": results, "seconds": seconds,
                                                     "benign_window_alert_rate_at_0.01": benign,
                                                     "note": "statistic_auroc: the variant alone (below 0.5: attack "
                                                             "windows score lower than benign ones); combined_auroc: "
                                                             "the window p-value with it in drift's place"}, args.out)
    print(path)


if __name__ == "__main__":
    main()
