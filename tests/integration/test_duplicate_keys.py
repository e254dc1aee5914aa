"""A YAML key set twice is refused wherever eventhub reads YAML, naming the file, the document
and the key, instead of the last value silently winning."""

from __future__ import annotations

import asyncio
from pathlib import Path

from eventhub.settings import Settings
from tests.support import RunningHub, run_eventhub

TWO_FUNCTIONS = """\
apiVersion: eventhub/v1
kind: Function
metadata: {name: f1}
spec: {url: "http://127.0.0.1:9/f1"}
---
apiVersion: eventhub/v1
kind: Function
metadata: {name: f2}
spec:
  url: "http://127.0.0.1:9/f2"
  timeout: 5s
  url: "http://127.0.0.1:9/other"
"""


async def test_apply_refuses_a_duplicate_key_in_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    file = tmp_path / "functions.yaml"
    file.write_text(TWO_FUNCTIONS)
    result = await asyncio.to_thread(run_eventhub, settings, "apply", "-f", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"eventhub: {file} (document 2): Function 'f2':"
        " spec.url: duplicate key (set at lines 10 and 12)"
    ]
    listed = await asyncio.to_thread(run_eventhub, settings, "get", "functions")
    assert listed.stdout.splitlines()[1:] == []  # nothing of the file was applied


async def test_a_settings_file_with_a_duplicate_key_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    file = tmp_path / "settings.yaml"
    file.write_text("log_level: info\nport: 8081\nport: 8082\n")
    result = await asyncio.to_thread(
        run_eventhub, settings, "get", "functions", EVENTHUB_SETTINGS_FILE=str(file)
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"eventhub: settings file: {file}: port: duplicate key (set at lines 2 and 3)"
    ]


async def test_a_resource_put_as_yaml_with_a_duplicate_key_is_400(hub: RunningHub) -> None:
    body = "spec:\n  url: http://127.0.0.1:9/a\n  timeout: 5s\n  url: http://127.0.0.1:9/b\n"
    async with hub.http.put(
        f"{hub.base_url}/v1/functions/f1",
        data=body,
        headers={"Content-Type": "application/yaml", **hub.auth()},
    ) as response:
        assert response.status == 400
        assert response.content_type == "application/problem+json"
        problem = await response.json()
    assert problem["errors"] == [
        {"field": "spec.url", "message": "duplicate key (set at lines 2 and 4)"}
    ]
    assert "spec.url" in problem["detail"]
    async with hub.http.get(f"{hub.base_url}/v1/functions/f1", headers=hub.auth()) as response:
        assert response.status == 404  # nothing was stored


async def test_apply_of_a_file_that_is_not_utf8_is_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    file = tmp_path / "binary.yaml"
    file.write_bytes(b"kind: Function\n\xff\xfe garbage")
    result = await asyncio.to_thread(run_eventhub, settings, "apply", "-f", str(file))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"eventhub: {file}: file 'binary.yaml': is not UTF-8 text (byte 15)"
    ]
