"""The eventhub command: apply (idempotent, dry run, prune), get, and one-line errors."""

from __future__ import annotations

from pathlib import Path

from eventhub.settings import Settings
from tests.support import run_eventhub

FUNCTION = """
apiVersion: eventhub/v1
kind: Function
metadata: {{name: {name}}}
spec: {{url: "http://127.0.0.1:9/{name}", timeout: {timeout}}}
"""
BINDING = """
apiVersion: eventhub/v1
kind: Binding
metadata: {name: b}
spec: {source: api, function: f1, filter: [{prefix: {type: com.}}]}
"""


def test_apply_is_idempotent_and_supports_dry_run_and_prune(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "functions.yaml").write_text(
        FUNCTION.format(name="f1", timeout="5s") + "---" + FUNCTION.format(name="f2", timeout="5s")
    )
    (tmp_path / "bindings.yml").write_text(BINDING)
    first = run_eventhub(settings, "apply", "-f", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "Function/f1 created",
        "Function/f2 created",
        "Binding/b created",
    ]
    again = run_eventhub(settings, "apply", "-f", str(tmp_path))
    assert "Function/f1 unchanged" in again.stdout and "created" not in again.stdout

    (tmp_path / "functions.yaml").write_text(FUNCTION.format(name="f1", timeout="9s"))
    dry = run_eventhub(settings, "apply", "-f", str(tmp_path), "--prune", "--dry-run")
    assert "Function/f1 configured (dry run)" in dry.stdout
    assert "Function/f2 pruned (dry run)" in dry.stdout
    listed = run_eventhub(settings, "get", "functions")
    assert "f2" in listed.stdout  # the dry run changed nothing

    pruned = run_eventhub(settings, "apply", "-f", str(tmp_path), "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "Function/f2 pruned" in pruned.stdout
    table = run_eventhub(settings, "get", "functions").stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "DEFAULT",
        "URL",
        "VERSIONS",
        "CONCURRENCY",
        "RATE",
        "DEAD-LETTER",
    ]
    assert [line.split()[0] for line in table[1:]] == ["f1"]
    shown = run_eventhub(settings, "get", "functions", "f1", "-o", "yaml")
    assert "timeout: 9s" in shown.stdout


def test_invalid_resources_fail_with_one_line_naming_file_resource_field(
    settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: eventhub/v1\nkind: Function\nmetadata: {name: broken}\n"
        "spec: {url: 'http://x', retry: {maxAttempts: -1}}\n"
    )
    result = run_eventhub(settings, "apply", "-f", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert str(bad) in line and "Function 'broken'" in line and "spec.retry.maxAttempts" in line

    dangling = tmp_path / "dangling.yaml"
    dangling.write_text(BINDING)
    result = run_eventhub(settings, "apply", "-f", str(dangling))
    assert result.returncode == 1
    assert "spec.function: Function 'f1' does not exist" in result.stderr

    (tmp_path / "syntax.yaml").write_text("kind: [unclosed\n")
    result = run_eventhub(settings, "apply", "-f", str(tmp_path / "syntax.yaml"))
    assert result.returncode == 1 and "not valid YAML at line" in result.stderr

    missing = run_eventhub(settings, "apply", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_bad_settings_fail_with_one_line(settings: Settings) -> None:
    result = run_eventhub(settings, "get", "functions", EVENTHUB_NAMESPACE="Bad Name!")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "EVENTHUB_NAMESPACE" in result.stderr


def test_pause_resume_and_status(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        FUNCTION.format(name="f1", timeout="5s")
        + "---\napiVersion: eventhub/v1\nkind: Source\nmetadata: {name: tick}\n"
        + "spec: {type: cron, schedule: '@every 1m'}\n"
        + "---\n"
        + BINDING.replace("source: api", "source: tick")
    )
    assert run_eventhub(settings, "apply", "-f", str(tmp_path)).returncode == 0
    paused = run_eventhub(settings, "pause", "binding", "b")
    assert paused.returncode == 0 and paused.stdout.strip() == "Binding/b paused"
    assert "paused: true" in run_eventhub(settings, "get", "bindings", "b", "-o", "yaml").stdout
    assert run_eventhub(settings, "resume", "binding", "b").stdout.strip() == "Binding/b resumed"
    assert run_eventhub(settings, "pause", "source", "tick").stdout.strip() == "Source/tick paused"
    status = run_eventhub(settings, "status", "tick")
    assert status.returncode == 0
    assert status.stdout.splitlines()[0] == "Source/tick type=cron paused=true"
    missing = run_eventhub(settings, "pause", "source", "nope")
    assert missing.returncode == 1 and "Source 'nope' does not exist" in missing.stderr
    assert run_eventhub(settings, "status", "source", "tick").stdout == status.stdout
    # No hub has run, so JetStream has neither the stream nor the consumer: nothing waits.
    backlog = run_eventhub(settings, "status", "function", "f1")
    assert backlog.returncode == 0, backlog.stderr
    assert backlog.stdout.strip() == (
        "Function/f1 paused=false maxConcurrency=10 queued=0 in-flight=0 retrying=0"
    )
    unknown = run_eventhub(settings, "status", "function", "nope")
    assert unknown.returncode == 1 and "Function 'nope' does not exist" in unknown.stderr
    wrong = run_eventhub(settings, "status", "binding", "b")
    assert wrong.returncode == 2 and "usage: eventhub status" in wrong.stderr


def test_dlq_commands(settings: Settings, tmp_path: Path) -> None:
    import asyncio
    from datetime import UTC, datetime

    from dlq.store import DeadLetterStore
    from eventhub import db
    from eventhub.events import Event
    from eventhub.ports import DeadLetterRecord, dead_letter_id

    (tmp_path / "f.yaml").write_text(FUNCTION.format(name="f1", timeout="5s"))
    assert run_eventhub(settings, "apply", "-f", str(tmp_path)).returncode == 0

    async def seed() -> None:
        pool = await db.connect(settings.database_url.get_secret_value(), settings.namespace)
        try:
            for i in range(3):
                now = datetime.now(UTC)
                attrs = {"specversion": "1.0", "id": f"e{i}", "source": "/s", "type": "t"}
                await DeadLetterStore(pool).store(
                    DeadLetterRecord(
                        id=dead_letter_id(f"i{i}"),
                        invocation_id=f"i{i}",
                        function="f1",
                        binding=None,
                        event=Event(attrs, b"{}"),
                        reason="non-retryable",
                        error_code="http-404",
                        error_message="gone",
                        attempts=[{"attempt": 1, "status": 404, "latencyMs": 1.5}],
                        enqueued_at=now,
                        failed_at=now,
                        dead_letter_function=None,
                    )
                )
        finally:
            await pool.close()

    asyncio.run(seed())
    listed = run_eventhub(settings, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "FAILED", "AT"] and len(lines) == 4
    dl_id = lines[1].split()[0]
    shown = run_eventhub(settings, "dlq", "show", dl_id)
    assert "non-retryable: gone" in shown.stdout and "http-404" not in shown.stderr
    assert "404" in shown.stdout
    stats = run_eventhub(settings, "dlq", "stats")
    assert stats.stdout.splitlines()[0] == "3 dead letters (not resolved)"
    dry = run_eventhub(settings, "dlq", "replay", "--function", "f1", "--dry-run")
    assert dry.stdout.startswith("3 dead letters would be replayed (dry run)")
    created = run_eventhub(settings, "dlq", "replay", dl_id, "--rate", "10/s")
    assert created.returncode == 0 and "1 dead letters at 10/s" in created.stdout
    assert "pending" in run_eventhub(settings, "dlq", "jobs").stdout
    refused = run_eventhub(settings, "dlq", "purge", "--function", "f1")
    assert refused.returncode == 1 and "confirm with --yes" in refused.stderr
    purged = run_eventhub(settings, "dlq", "purge", "--function", "f1", "--yes")
    assert purged.stdout.strip() == "purged 2 dead letters"  # the one the job took stays
    bad = run_eventhub(settings, "dlq", "replay", "--rate", "fast")
    assert bad.returncode == 1 and "--rate" in bad.stderr and "Traceback" not in bad.stderr
