"""One import per method file: importing registers it (peft-style: one file + one line)."""

from moeguard.attribution import (  # noqa: F401
    ablation,
    ablation_screened,
    contrastive,
    frequency,
    gate,
    gradient,
    reap,
    reap_raw,
    reconstruction,
)
