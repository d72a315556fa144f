"""Importing this module registers every built-in strategy (one file each)."""

from moeguard.realign.strategies import coreset, hybrid, orphan, random_, uncertainty  # noqa: F401
