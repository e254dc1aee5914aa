"""Flows: functions chained into runs (a sequence, choices, parallel steps and their join).

- :mod:`eventhub.flows.spec`: the Flow resource and its validation;
- :mod:`eventhub.flows.expr`: its expressions (choice conditions, input mappings), in CEL;
- :mod:`eventhub.flows.plan`: where a run goes next, as a pure function;
- :mod:`eventhub.flows.steps`: a step as an invocation (ids, the event sent);
- :mod:`eventhub.flows.store`: run and step state in PostgreSQL;
- :mod:`eventhub.flows.runs`: runs as the API and the CLI show them;
- :mod:`eventhub.flows.engine`: starts runs and advances them as their steps settle.

Nothing is imported here: :mod:`eventhub.resources` imports the spec alone.
"""
