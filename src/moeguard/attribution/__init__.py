"""Which experts serve a task: one file per method, registered in registry.py."""
