"""The moeguard command line: typed functions over the Python API, nothing more.

:mod:`moeguard.cli.app` holds what every command shares (the app, common options, the error
handling of :func:`main`); each area's commands are one module, imported here so they register
on the app.
"""

from moeguard.cli.app import _format_warning, app, main
from moeguard.cli import audit, defense, models, routeattack, monitor, pruning, realign, scan, trace, zoo  # noqa: E402,F401  (register commands)

__all__ = ["app", "main", "_format_warning", "audit", "defense", "models", "routeattack", "monitor", "pruning", "realign", "scan", "trace", "zoo"]
