"""moeguard: audit and harden Mixture-of-Experts LLMs against unauthorized expert pruning."""

__version__ = "0.1.0"
