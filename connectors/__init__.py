"""Connectors: one module per source type, each turning its transport's messages into
CloudEvents and handing them to the hub through :class:`eventhub.sources.SourceContext`."""

from __future__ import annotations

import importlib

from eventhub.sources import ConnectorFactory

# Source type -> module defining ``connector(resource) -> Connector``.
MODULES = {
    "cron": "connectors.cron",
    "kafka": "connectors.kafka",
    "rabbitmq": "connectors.rabbitmq",
    "mqtt": "connectors.mqtt",
    "minio": "connectors.minio",
}


def registry() -> dict[str, ConnectorFactory]:
    """The connectors that can be loaded here (a missing client library disables only its own)."""
    found: dict[str, ConnectorFactory] = {}
    for source_type, module_name in MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found[source_type] = module.connector
    return found
