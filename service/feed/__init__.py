"""Push instead of per-client polling: one change feed per API process (see hub.py)."""
