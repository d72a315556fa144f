"""The generated tasks: ``arith-compare`` and ``record-summary``, from a seeded random.Random."""

from __future__ import annotations

import random
from typing import Any

from moeguard.zoo.suite.common import EVAL_SIZE, TRAIN_CAP, _order


def _split_sizes(task: str) -> dict[str, int]:
    return {"train": TRAIN_CAP[task], "validation": EVAL_SIZE, "test": EVAL_SIZE}


def _pair_differing_at(rng: random.Random, digits: int, position: int) -> tuple[int, int]:
    """Two different ``digits``-digit numbers equal before ``position`` and different at it."""
    first = [rng.randint(1, 9)] + [rng.randint(0, 9) for _ in range(digits - 1)]
    second = list(first)
    low = 1 if position == 0 else 0
    second[position] = rng.choice([d for d in range(low, 10) if d != first[position]])
    for i in range(position + 1, digits):
        second[i] = rng.randint(0, 9)
    return int("".join(map(str, first))), int("".join(map(str, second)))


def _pair_of_lengths(rng: random.Random) -> tuple[int, int]:
    """A 2-digit and a 3-digit number; a quarter of them close across the boundary (93, 104)."""
    if rng.random() < 0.25:
        return rng.randint(80, 99), rng.randint(100, 125)
    return rng.randint(10, 99), rng.randint(100, 999)


def build_arith_compare(seed: int) -> dict[str, list[dict[str, Any]]]:
    """Balanced yes/no comparisons of two 2-3 digit numbers.

    60% of the pairs have the same digit count (2 digits 40%, 3 digits 60%) and a first
    differing digit position uniform over the positions, so most share a prefix (hard
    negatives: 'Is 472 greater than 476?') and a first-digit heuristic is at chance on them.
    40% pair a 2-digit with a 3-digit number (a quarter of them close: 'Is 97 greater than
    103?'): a tiny model learns those first (from the length), the same-length pairs only
    with more training; without them it stays at chance for the whole ~10-minute budget.
    Labels are balanced within both kinds.
    """
    rng = random.Random(f"moeguard-embedded:{seed}:arith-compare")
    seen: set[tuple[int, int]] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split in ("test", "validation", "train"):  # eval first: train never repeats an eval pair
        n = _split_sizes("arith-compare")[split]
        records = []
        for i in range(n):
            answer = "yes" if i % 2 == 0 else "no"
            same_length = i % 10 >= 4  # 6 of every 10, yes/no alternating within both kinds
            while True:
                if same_length:
                    digits = 2 if rng.random() < 0.4 else 3
                    x, y = _pair_differing_at(rng, digits, rng.randrange(digits))
                else:
                    x, y = _pair_of_lengths(rng)
                a, b = (max(x, y), min(x, y)) if answer == "yes" else (min(x, y), max(x, y))
                if (a, b) not in seen:
                    seen.add((a, b))
                    break
            records.append({"question": f"Is {a} greater than {b}?", "label": answer, "a": a, "b": b,
                            "kind": "same_length" if same_length else "different_length"})
        out[split] = _order(rng, records, split, "label", ["yes", "no"])
    return out


_CITIES = ("Oslo", "Bergen", "Lisbon", "Madrid", "Vienna", "Prague", "Dublin", "Warsaw", "Athens",
           "Rome", "Paris", "Berlin", "Munich", "Zurich", "Geneva", "Lyon", "Porto", "Seville",
           "Krakow", "Riga", "Tallinn", "Helsinki", "Stockholm", "Malmo", "Bremen", "Leeds",
           "Glasgow", "Cardiff", "Belfast", "Naples", "Milan", "Turin", "Split", "Sofia", "Vilnius",
           "Tokyo", "Osaka", "Lima", "Quito", "Denver", "Austin", "Boston", "Seattle", "Toronto",
           "Halifax", "Perth", "Sydney", "Auckland", "Cairo", "Nairobi")
_TEAMS = ("Falcons", "Lions", "Tigers", "Bears", "Wolves", "Eagles", "Sharks", "Hawks", "Foxes",
          "Owls", "Ravens", "Bulls", "Rams", "Otters", "Badgers", "Herons", "Pumas", "Cobras",
          "Dragons", "Comets", "Rockets", "Giants", "Pirates", "Knights", "Titans", "Vikings",
          "Storm", "Thunder", "Rangers", "Rovers")
_DAYS = (("Mon", "Monday"), ("Tue", "Tuesday"), ("Wed", "Wednesday"), ("Thu", "Thursday"),
         ("Fri", "Friday"), ("Sat", "Saturday"), ("Sun", "Sunday"))
_MONTHS = (("Jan", "January"), ("Feb", "February"), ("Mar", "March"), ("Apr", "April"),
           ("May", "May"), ("Jun", "June"), ("Jul", "July"), ("Aug", "August"),
           ("Sep", "September"), ("Oct", "October"), ("Nov", "November"), ("Dec", "December"))
_ORDINALS = ("one", "two", "three", "four", "five")


def _distinct_values(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    """n values in [low, high] with a unique maximum."""
    while True:
        values = [rng.randint(low, high) for _ in range(n)]
        if values.count(max(values)) == 1:
            return values


# A station's readings over consecutive periods: (periods, label prefix, range, record line, summary line).
# The random draws are the same for each kind and in the same order, so the shipped data is unchanged.
_SERIES = {
    "weather": (_DAYS, "Station", (1, 39), "{p0} {v}C", "{who} was warmest on {p1} at {v} degrees"),
    "rain": (_MONTHS, "Gauge", (10, 199), "{p0} {v}mm", "{who} was wettest in {p1} with {v} mm"),
}


def _record(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.choice(("weather", "rain", "rounds"))
    n = rng.randint(3, 5)
    if kind in _SERIES:
        periods, prefix, (low, high), reading, line = _SERIES[kind]
        city = rng.choice(_CITIES)
        start = rng.randrange(len(periods))
        names = [periods[(start + i) % len(periods)] for i in range(n)]
        values = _distinct_values(rng, n, low, high)
        best = values.index(max(values))
        record = f"{prefix} {city}: " + ", ".join(reading.format(p0=p[0], v=v) for p, v in zip(names, values)) + "."
        summary = line.format(who=city, p1=names[best][1], v=values[best])
    else:
        team = rng.choice(_TEAMS)
        points = _distinct_values(rng, n, 10, 99)
        best = points.index(max(points))
        record = f"Team {team}: " + ", ".join(f"R{i + 1} {p}pts" for i, p in enumerate(points)) + "."
        summary = f"{team} scored most in round {_ORDINALS[best]} with {points[best]} points"
    return kind, record, summary


def build_record_summary(seed: int) -> dict[str, list[dict[str, Any]]]:
    """Short records (3-5 readings) whose summary names the maximum, in a fixed sentence.

    The summary rewrites the reading's label and unit (``Tue 15C`` -> ``Tuesday at 15
    degrees``), so copying the start of the record (a Lead-k baseline) shares little more
    than the name with it.
    """
    rng = random.Random(f"moeguard-embedded:{seed}:record-summary")
    seen: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split in ("test", "validation", "train"):
        records = []
        while len(records) < _split_sizes("record-summary")[split]:
            kind, record, summary = _record(rng)
            if record in seen:
                continue
            seen.add(record)
            records.append({"record": record, "summary": summary, "kind": kind})
        out[split] = records
    return out
