"""Active-learning strategies; see base.py."""
