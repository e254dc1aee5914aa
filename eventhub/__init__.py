"""eventhub: the event side of a FaaS platform.

CloudEvents come in (HTTP API, connectors), bindings kept in PostgreSQL route them to functions,
NATS JetStream buffers one invocation per matched binding, a dispatcher invokes each function over
HTTP at least once, and what still fails becomes a dead letter kept for operators.
"""

__version__ = "0.1.0"
