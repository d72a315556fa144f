"""The embedded task suite: tasks built from the Python standard library and generated data.

The data ships in ``data/``; ``build.py`` rebuilds it (``python -m moeguard.tasks.embedded.build``).
"""
