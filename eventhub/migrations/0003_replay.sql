-- Replay jobs: a snapshot of the dead letters to replay (replay_items, in order), replayed at a
-- bounded rate by whichever hub process holds the job's lease, so a job survives a restart.
create table replay_jobs (
    id            uuid        primary key,
    status        text        not null default 'pending'
                  check (status in ('pending', 'running', 'done', 'cancelled', 'failed')),
    to_function   text,
    rate          double precision not null,  -- dead letters per second
    total         integer     not null,
    processed     integer     not null default 0,
    published     integer     not null default 0,
    skipped       integer     not null default 0,
    succeeded     integer     not null default 0,
    failed        integer     not null default 0,
    error         text,
    lease_owner   text,
    lease_until   timestamptz,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now()
);

create table replay_items (
    job_id          uuid    not null references replay_jobs (id) on delete cascade,
    seq             integer not null,
    dead_letter_id  uuid    not null,
    state           text    not null default 'pending'
                    check (state in ('pending', 'published', 'skipped')),
    primary key (job_id, seq)
);

-- The job replaying a dead letter now, or that replayed it last.
alter table dead_letters add column replay_job uuid;
create index dead_letters_error on dead_letters (error_code, failed_at desc);
