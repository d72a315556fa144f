"""Expert merging, the second compression route (issue 20): each MoE layer's experts are
clustered and each cluster averaged into one expert, router rows combined the same way.

One file per method (``average.py``, ``frequency.py``, ``hc_smoe.py``, ``router_weighted.py``),
each registered by one call in :mod:`moeguard.pruning.merging.base`; ``operation.py`` holds the
weight arithmetic every method shares, ``calibrate.py`` what the methods measure on data, and
``write.py`` the checkpoint (docs/merging.md).
"""
