"""The SQL store: tables (models), engine, sessions and migrations (db), and one module of
queries per concern: plans, claims (the queue), registry (workers), keys (and their submit
buckets), audit_trail, fidelity_stats; common holds what they share. Every query function takes
the session first and the rest by keyword."""
