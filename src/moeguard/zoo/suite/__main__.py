"""``python -m moeguard.zoo.suite --out DIR --seed 0 [--python-stdlib PATH] [--overwrite]``:
``moeguard zoo suite`` by another name (the same checks, atomic output and one-line errors)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from moeguard.cli import main as cli

    return cli(["zoo", "suite", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
