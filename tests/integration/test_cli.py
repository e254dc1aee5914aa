"""The eventhub command: apply (idempotent, dry run, prune), get, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from eventhub.settings import Settings
from tests.support import settings_env

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


def eventhub(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventhub", *args],
        env=settings_env(settings, 0),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_apply_is_idempotent_and_supports_dry_run_and_prune(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "functions.yaml").write_text(
        FUNCTION.format(name="f1", timeout="5s") + "---" + FUNCTION.format(name="f2", timeout="5s")
    )
    (tmp_path / "bindings.yml").write_text(BINDING)
    first = eventhub(settings, "apply", "-f", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "Function/f1 created",
        "Function/f2 created",
        "Binding/b created",
    ]
    again = eventhub(settings, "apply", "-f", str(tmp_path))
    assert "Function/f1 unchanged" in again.stdout and "created" not in again.stdout

    (tmp_path / "functions.yaml").write_text(FUNCTION.format(name="f1", timeout="9s"))
    dry = eventhub(settings, "apply", "-f", str(tmp_path), "--prune", "--dry-run")
    assert "Function/f1 configured (dry run)" in dry.stdout
    assert "Function/f2 pruned (dry run)" in dry.stdout
    listed = eventhub(settings, "get", "functions")
    assert "f2" in listed.stdout  # the dry run changed nothing

    pruned = eventhub(settings, "apply", "-f", str(tmp_path), "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "Function/f2 pruned" in pruned.stdout
    table = eventhub(settings, "get", "functions").stdout.splitlines()
    assert table[0].split() == ["NAME", "URL", "CONCURRENCY", "RATE", "DEAD-LETTER"]
    assert [line.split()[0] for line in table[1:]] == ["f1"]
    shown = eventhub(settings, "get", "functions", "f1", "-o", "yaml")
    assert "timeout: 9s" in shown.stdout


def test_invalid_resources_fail_with_one_line_naming_file_resource_field(
    settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: eventhub/v1\nkind: Function\nmetadata: {name: broken}\n"
        "spec: {url: 'http://x', retry: {maxAttempts: -1}}\n"
    )
    result = eventhub(settings, "apply", "-f", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert str(bad) in line and "Function 'broken'" in line and "spec.retry.maxAttempts" in line

    dangling = tmp_path / "dangling.yaml"
    dangling.write_text(BINDING)
    result = eventhub(settings, "apply", "-f", str(dangling))
    assert result.returncode == 1
    assert "spec.function: Function 'f1' does not exist" in result.stderr

    (tmp_path / "syntax.yaml").write_text("kind: [unclosed\n")
    result = eventhub(settings, "apply", "-f", str(tmp_path / "syntax.yaml"))
    assert result.returncode == 1 and "not valid YAML at line" in result.stderr

    missing = eventhub(settings, "apply", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_bad_settings_fail_with_one_line(settings: Settings) -> None:
    env = settings_env(settings, 0)
    env["EVENTHUB_NAMESPACE"] = "Bad Name!"
    result = subprocess.run(
        [sys.executable, "-m", "eventhub", "get", "functions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
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
    assert eventhub(settings, "apply", "-f", str(tmp_path)).returncode == 0
    paused = eventhub(settings, "pause", "binding", "b")
    assert paused.returncode == 0 and paused.stdout.strip() == "Binding/b paused"
    assert "paused: true" in eventhub(settings, "get", "bindings", "b", "-o", "yaml").stdout
    assert eventhub(settings, "resume", "binding", "b").stdout.strip() == "Binding/b resumed"
    assert eventhub(settings, "pause", "source", "tick").stdout.strip() == "Source/tick paused"
    status = eventhub(settings, "status", "tick")
    assert status.returncode == 0
    assert status.stdout.splitlines()[0] == "Source/tick type=cron paused=true"
    missing = eventhub(settings, "pause", "source", "nope")
    assert missing.returncode == 1 and "Source 'nope' does not exist" in missing.stderr
