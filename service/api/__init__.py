"""The HTTP API: app factory, dependencies, problem details, routes."""
