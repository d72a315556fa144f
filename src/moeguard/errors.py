"""User-facing errors: what was received, what was expected, and the fix.

The CLI turns a :class:`MoeguardError` into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MoeguardError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")

    def one_line(self) -> str:
        text = self.message if self.hint is None else f"{self.message} Fix: {self.hint}"
        return " ".join(text.split())


def suggest(name: str, choices: list[str]) -> str:
    """'did you mean ...' text for registry misses, in the lm-eval-harness manner."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    known = ", ".join(sorted(choices))
    if close:
        return f"did you mean {', '.join(close)}? Known: {known}"
    return f"known: {known}"


def own_warning(category: type, filename: str) -> bool:
    """Whether a warning is moeguard's own: a UserWarning raised from its package's files (the CLI
    shows those as one line a user reads; attribution keeps them with a method's scores)."""
    from pathlib import Path

    # by the package's own folder, not a path containing "moeguard": a checkout named moeguard holds the
    # venv's libraries under .../moeguard/ too
    package = Path(__file__).resolve().parent   # src/moeguard (or site-packages/moeguard)
    return issubclass(category, UserWarning) and package in Path(str(filename)).resolve().parents
