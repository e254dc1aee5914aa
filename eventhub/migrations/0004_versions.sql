-- The version of the function a dead letter's invocation called (a function without named
-- versions has one, "latest").
alter table dead_letters add column version text not null default 'latest';
create index dead_letters_version on dead_letters (function, version, failed_at desc);
