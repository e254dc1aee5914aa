-- Combinations of events (eventhub.combos): the events a combination binding collected, per
-- correlation key, and the combinations that fired. An event is kept after it fired (`fired`
-- set) so that its redelivery is recognised and does not fire again; the sweeper removes
-- those a day later, and the ones still pending once they are older than the window.
create table combination_events (
    binding      text        not null,
    dependency   text        not null,
    event_source text        not null,
    event_id     text        not null,
    key          text        not null,
    event        bytea       not null,   -- the structured CloudEvent (JSON)
    received_at  timestamptz not null default now(),
    fired        uuid,                   -- the combination it was part of
    primary key (binding, dependency, event_source, event_id)
);
create index combination_events_pending on combination_events (binding, key, received_at)
    where fired is null;
create index combination_events_fired on combination_events (received_at) where fired is not null;

create table combinations (
    id        uuid        primary key,
    binding   text        not null,
    key       text        not null,
    input     bytea       not null,      -- {dependency: structured CloudEvent}
    fired_at  timestamptz not null default now()
);
create index combinations_fired_at on combinations (fired_at);
