"""Are two result documents equal in every number? The check behind "refactors keep the numbers".

    python benchmarks/compare_numbers.py --pair audit OLD/results.json NEW/results.json \\
        --pair sweep OLD/sweep.json NEW/sweep.json ... --out benchmarks/results/refactor_equality.json

For each pair: every value present in both documents must be equal (numbers exactly: the same
float, not a tolerance), timing fields excluded (``moeguard.audit.results.not_a_number``). Keys only
in the new document are listed as additions, keys only in the old one as removals; ``--expect
KEY=reason`` names a key whose differences are expected and says why (reported, not hidden).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from moeguard.audit.results import not_a_number  # noqa: E402


def compare(old: Any, new: Any, path: str, out: dict[str, list], expected: dict[str, str], *, top: bool = False) -> None:
    key = path.rsplit(".", 1)[-1].split("[")[0]
    if key in expected:
        if old != new:
            out["expected"].append({"path": path, "reason": expected[key]})
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for k in old:
            if not_a_number(k, old[k], top=top):
                continue
            if k not in new:
                out["removed"].append(f"{path}.{k}")
            else:
                compare(old[k], new[k], f"{path}.{k}", out, expected)
        out["added"] += [f"{path}.{k}" for k in new if k not in old and not not_a_number(k, new[k], top=top)]
        return
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            out["different"].append({"path": path, "old": f"{len(old)} items", "new": f"{len(new)} items"})
            return
        for i, (a, b) in enumerate(zip(old, new)):
            compare(a, b, f"{path}[{i}]", out, expected)
        return
    if old != new and not (old != old and new != new):  # NaN == NaN here
        out["different"].append({"path": path, "old": old, "new": new})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", nargs=3, action="append", metavar=("NAME", "OLD", "NEW"), required=True)
    ap.add_argument("--expect", action="append", default=[], metavar="KEY=REASON")
    ap.add_argument("--out", default=None, help="where to record the comparison; without it nothing is written "
                    "(a quick check must not replace the recorded one, benchmarks/results/refactor_equality.json)")
    args = ap.parse_args()
    expected = dict(e.split("=", 1) for e in args.expect)
    report = {}
    for name, a, b in args.pair:
        out: dict[str, list] = {"different": [], "removed": [], "added": [], "expected": []}
        compare(json.loads(Path(a).read_text()), json.loads(Path(b).read_text()), name, out, expected, top=True)
        # additions below an added key say nothing new: keep the top ones
        out["added"] = sorted(x for x in out["added"] if not any(x.startswith(y + ".") for y in out["added"] if y != x))
        out["equal"] = not out["different"] and not out["removed"]
        report[name] = {"old": a, "new": b, **out}
        print(f"{name}: {'EQUAL' if out['equal'] else 'DIFFERENT'} in every shared number "
              f"({len(out['different'])} different, {len(out['removed'])} removed, {len(out['added'])} added, "
              f"{len(out['expected'])} expected differences)")
        for d in out["different"][:10]:
            print("   ", d)
    if args.out:
        write_result("refactor_equality", {"pairs": report, "expected": expected}, args.out)
    else:
        print("not recorded (pass --out FILE to keep it)")
    if not all(r["equal"] for r in report.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
