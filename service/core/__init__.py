"""Plumbing every HTTP-facing package shares, below all of them: problem details, the
settings and session dependencies, and who the caller is (the principal)."""
