"""Defenses against unauthorized expert pruning, the fine-tuning protocol, and the attack harness that scores them."""
