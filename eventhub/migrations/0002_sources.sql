-- Pausing is an operator's switch, kept apart from the declared spec so `apply` never undoes it.
alter table resources add column paused boolean not null default false;

-- Small durable state a connector keeps between runs (cron: the last tick fired; MinIO: the last
-- event seen), one JSON document per source.
create table source_state (
    source      text        primary key,
    state       jsonb       not null,
    updated_at  timestamptz not null default now()
);

-- A message a source could not turn into an event is kept as a dead letter of its source:
-- no function was involved.
alter table dead_letters alter column function drop not null;
alter table dead_letters add column source_name text;
create index dead_letters_source_failed on dead_letters (source_name, failed_at desc);
