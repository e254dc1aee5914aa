"""The HTTP API (aiohttp): ingress, resources, invocations, dead letters, health and metrics."""
