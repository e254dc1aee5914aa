-- Resources: functions, sources and bindings, one row each.
create table resources (
    kind        text        not null check (kind in ('Function', 'Source', 'Binding')),
    name        text        not null,
    spec        jsonb       not null,
    labels      jsonb       not null default '{}',
    -- The `eventhub apply --set` that declared it; null when made over the API. Used by --prune.
    apply_set   text,
    generation  bigint      not null default 1,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    primary key (kind, name)
);

-- Dead letters: one row per invocation that failed for good. A replay (later) appends its
-- attempts to the same row, so `invocation_id` is the original invocation's.
create table dead_letters (
    id               uuid        primary key,
    invocation_id    text        not null unique,
    function         text        not null,
    binding          text,
    event_source     text        not null,
    event_id         text        not null,
    event_type       text        not null,
    -- The original CloudEvent: its attributes (extensions included) and its data, byte for byte.
    attributes       jsonb       not null,
    data             bytea       not null,
    reason           text        not null,  -- non-retryable | attempts-exhausted | event-expired
    error_code       text        not null,  -- http-404, http-500, timeout, connection, ...
    error_message    text        not null,
    attempts         jsonb       not null,  -- [{attempt, startedAt, latencyMs, status, error, response}]
    enqueued_at      timestamptz not null,
    failed_at        timestamptz not null,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    status           text        not null default 'dead'
                     check (status in ('dead', 'replaying', 'resolved')),
    replay_count     integer     not null default 0,
    dead_letter_function text,
    -- Outcome of the delivery to the dead-letter function.
    dlf_status       text        not null default 'none'
                     check (dlf_status in ('none', 'pending', 'delivered', 'failed')),
    dlf_error        text
);

create index dead_letters_function_failed on dead_letters (function, failed_at desc);
create index dead_letters_binding_failed on dead_letters (binding, failed_at desc);
create index dead_letters_failed on dead_letters (failed_at desc);
create index dead_letters_status on dead_letters (status, failed_at desc);
