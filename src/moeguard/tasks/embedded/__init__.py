"""The embedded task suite: tasks built from the Python standard library and generated data.

The data ships in ``data/``; :mod:`moeguard.zoo.suite` rebuilds it (``moeguard zoo suite --out DIR``).
"""
