"""One import per defense file: importing registers it (peft-style: one file + one line)."""

from moeguard.defense.methods import entangle, selective  # noqa: F401
