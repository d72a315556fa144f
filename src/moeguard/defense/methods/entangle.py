"""Entangled expert training: every task leans on all experts jointly, and pruning plus a short
fine-tune (the simulated attacker) leaves the task's loss high. See docs/defenses.md."""

from moeguard.defense.harden import DefenseSpec, register_defense

register_defense(DefenseSpec(
    "entangle",
    "per-task routing balance + pruned-model collapse + first-order adversarial prune-and-fine-tune term",
    {"balance": 0.1, "collapse": 1.0, "adversarial": 1.0}))
