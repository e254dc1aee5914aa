-- Canary rollouts on a function's alias: the canary's weight grows step by step while it holds
-- against the stable version; the weights in force are read by every hub process's router.
-- Whichever process holds a rollout's lease drives it, so a rollout survives a restart.
create table rollouts (
    id                 uuid        primary key,
    function           text        not null,
    alias              text        not null,
    stable             text        not null,
    canary             text        not null,
    steps              integer[]   not null,  -- the canary's weight at each step, increasing
    interval_s         double precision not null,  -- each step lasts at least this long
    max_error_rate     double precision not null,
    max_latency_ratio  double precision not null,
    min_calls          integer     not null,
    on_rollback        text        not null check (on_rollback in ('stable', 'dead-letter')),
    state              text        not null default 'running'
                       check (state in ('running', 'paused', 'promoted', 'rolled-back', 'aborted')),
    step               integer     not null default 0,  -- index into steps
    weight             integer     not null,  -- the canary's weight now
    step_started_at    timestamptz not null,
    reason             text,                   -- why it ended
    history            jsonb       not null default '[]',  -- one item per step ended
    lease_owner        text,
    lease_until        timestamptz,
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now()
);

-- One rollout at a time per alias.
create unique index rollouts_one_active on rollouts (function, alias)
    where state in ('running', 'paused');
-- The latest rollout of each alias (what the routers read), and listings.
create index rollouts_latest on rollouts (function, alias, created_at desc);
create index rollouts_recent on rollouts (created_at desc);
