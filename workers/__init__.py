"""The worker loop and the profiling engine."""
