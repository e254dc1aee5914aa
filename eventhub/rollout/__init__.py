"""Progressive canary rollouts on a function's alias.

A rollout moves an alias from its stable version to a canary version in steps (by default the
canary weighs 10, 25, 50, then 100 %), each lasting at least ``interval``. At every step the
canary is judged against the stable version on the calls both made in the same window, from
the statistics of every hub process (:mod:`eventhub.rollout.judge`): error rate and p95 latency,
once the canary made ``minCalls`` calls. When every step holds, the stored alias is changed to
name the canary (promoted); when a threshold breaks, the canary's weight is 0 at once (rolled
back) and the invocations already queued for it through the alias are sent to the stable
version, or kept as dead letters (``onRollback``).

::

    running --held (last step)--> promoted        running --broke--> rolled-back
    running <--resume-- paused <--pause-- running   running|paused --abort--> aborted

Modules: :mod:`~eventhub.rollout.plan` (a request, checked), :mod:`~eventhub.rollout.judge`
(a step's verdict, pure), :mod:`~eventhub.rollout.store` (PostgreSQL, and the weights every
router reads), :mod:`~eventhub.rollout.driver` (the loop that moves rollouts on).
"""

from eventhub.rollout.driver import RolloutDriver
from eventhub.rollout.judge import Analysis, Sample, Verdict, judge
from eventhub.rollout.plan import Plan, Request, parse_request, plan
from eventhub.rollout.store import Rollout, Rollouts

__all__ = [
    "Analysis",
    "Plan",
    "Request",
    "Rollout",
    "RolloutDriver",
    "Rollouts",
    "Sample",
    "Verdict",
    "judge",
    "parse_request",
    "plan",
]
