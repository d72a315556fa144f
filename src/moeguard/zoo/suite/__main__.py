"""``python -m moeguard.zoo.suite --out DIR --seed 0 [--python-stdlib PATH]``: rebuild the
embedded suite's data (``moeguard zoo suite`` does the same with this interpreter's stdlib)."""

from __future__ import annotations

import argparse

from moeguard.zoo.suite.builder import build_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeguard.zoo.suite",
                                     description="Rebuild the embedded task suite from the stdlib.")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits and generated tasks")
    parser.add_argument("--python-stdlib", default=None,
                        help="stdlib folder to read (default: this interpreter's)")
    args = parser.parse_args(argv)
    manifest = build_suite(args.out, seed=args.seed, python_stdlib=args.python_stdlib)
    total = 0
    for task, info in manifest["tasks"].items():
        counts = ", ".join(f"{s} {v['records']}" for s, v in info["splits"].items())
        size = sum(v["bytes"] for v in info["splits"].values())
        total += size
        print(f"{task:16s} {counts}  ({size / 1024:.0f} KiB)")
    print(f"total {total / 1024:.0f} KiB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
