"""Connectors: one module per source type, each turning its transport's messages into
CloudEvents and handing them to :class:`eventhub.ingress.Ingress`."""
