"""What an environment has that the lock file does not: ``python -m moeguard.lockdiff requirements.lock``.

`make test-latest` prints it before running the suite on the newest versions the ranges allow, so
its result names the versions it tried; ``tests/test_lock.py`` uses it to check that the test venv
holds exactly the lock's versions.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path) -> dict[str, str]:
    """Package -> pinned version, from a pip-compile lock file (``name==version \\`` lines)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


# installed beside the locked packages by every venv: the installer itself and the project
_NOT_LOCKED = {"pip", "setuptools", "wheel", "moeguard"}


def differences(lock: dict[str, str], have: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(package, locked, installed) for every locked package whose installed version differs, and
    (package, None, installed) for every package installed that the lock does not name (a stray
    ``pip install``, or a dependency a newer version pulled in)."""
    changed = [(n, v, have.get(n)) for n, v in lock.items() if have.get(n) != v]
    extra = [(n, None, v) for n, v in have.items() if n not in lock and n not in _NOT_LOCKED]
    return sorted(changed + extra)


def main(argv: list[str]) -> int:
    lock = read_lock(argv[0] if argv else "requirements.lock")
    diff = differences(lock, installed())
    if not diff:
        print(f"every one of the {len(lock)} locked packages is installed at its locked version")
        return 0
    print(f"{len(diff)} of {len(lock)} locked packages differ from the lock (locked -> installed):")
    for name, want, have in diff:
        print(f"  {name}: {want or 'not in the lock'} -> {have or 'not installed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
