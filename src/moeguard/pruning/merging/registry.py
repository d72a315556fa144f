"""Imports every built-in merge method so it registers (one line per method)."""

from moeguard.pruning.merging import average, frequency, hc_smoe, router_weighted  # noqa: F401
