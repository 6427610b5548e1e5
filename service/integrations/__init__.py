"""Adapters between schedulers' admission hooks and a plan: each parses its scheduler's request
and answers in its scheduler's shape, over the same plan the API makes."""
