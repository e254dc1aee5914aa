-- Flows: a new kind of resource, its runs and each step a run entered.
alter table resources drop constraint resources_kind_check;
alter table resources add constraint resources_kind_check
    check (kind in ('Function', 'Source', 'Binding', 'Flow'));

-- One row per run: made when the trigger event is routed (its id derives from the event and
-- the binding, so a redelivered event finds its run), changed under `for update` by whichever
-- process settles one of its steps.
create table flow_runs (
    id              uuid        primary key,
    flow            text        not null,
    binding         text,
    status          text        not null default 'running'
                    check (status in ('running', 'succeeded', 'failed')),
    trigger_id      text        not null,
    trigger_source  text        not null,
    trigger_type    text        not null,
    error           text,                   -- why it failed
    output          text,                   -- the first KiB of its output, once succeeded
    started_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    ended_at        timestamptz
);
create index flow_runs_recent on flow_runs (flow, started_at desc, id desc);
create index flow_runs_status on flow_runs (flow, status, started_at desc, id desc);

-- One row per step a run entered (seq counts them from 0; a cycle enters a step again under a
-- new seq), and one per branch of a parallel step (branch >= 0; the step itself is -1).
create table flow_steps (
    run_id          uuid        not null references flow_runs (id) on delete cascade,
    seq             integer     not null,
    branch          integer     not null,
    name            text        not null,
    kind            text        not null check (kind in ('function', 'choice', 'parallel', 'branch')),
    status          text        not null default 'running'
                    check (status in ('running', 'succeeded', 'failed')),
    target          text,                   -- the function target as declared
    version         text,                   -- the version called
    attempts        integer     not null default 0,
    fails_run       boolean     not null default false,  -- its failure holds the run failed
    output          bytea,                  -- the whole result (the first one recorded wins)
    output_type     text,                   -- its Content-Type
    excerpt         text,                   -- its first KiB, as text
    error           text,
    dead_letter_id  uuid,
    queued_at       timestamptz not null default now(),
    started_at      timestamptz,            -- its last attempt's start
    ended_at        timestamptz,
    primary key (run_id, seq, branch)
);

-- A dead letter of a flow step keeps where it stood: {flow, run, step, seq, branch}.
alter table dead_letters add column flow_context jsonb;
