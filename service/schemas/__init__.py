"""Pydantic models of the public contract: the plan request and the plan result."""
