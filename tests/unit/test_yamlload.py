"""YAML as eventhub reads it: a key set twice in a mapping is refused, naming the key's path,
both lines and the document; everything else loads as yaml.safe_load does."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eventhub import yamlload
from eventhub.settings import Settings


def duplicate(text: str) -> yamlload.DuplicateKey:
    with pytest.raises(yamlload.DuplicateKey) as exc:
        list(yamlload.load_all(text))
    return exc.value


def test_loads_like_safe_load() -> None:
    text = "a: 1\nb: {c: [1, 2, {d: x}]}\nwhen: 2024-01-01\n"
    assert yamlload.load(text) == yaml.safe_load(text)
    assert list(yamlload.load_all("a: 1\n---\n---\nb: 2\n")) == [{"a": 1}, None, {"b": 2}]


def test_a_top_level_key_set_twice_is_refused_with_both_lines() -> None:
    err = duplicate("kind: Function\nspec: {}\nkind: Source\n")
    assert (err.path, err.first_line, err.line, err.document) == ("kind", 1, 3, 1)
    assert str(err) == "kind: duplicate key (set at lines 1 and 3)"
    assert isinstance(err, yaml.YAMLError)  # callers that catch YAML errors still catch it


def test_a_nested_key_is_named_by_its_path() -> None:
    err = duplicate("spec:\n  filter:\n    - exact: {type: a}\n    - exact: {type: b, type: c}\n")
    assert err.path == "spec.filter[1].exact.type"
    assert (err.first_line, err.line) == (4, 4)


def test_the_document_is_counted_in_the_stream_and_its_root_kept() -> None:
    err = duplicate(
        "a: 1\n---\n# empty\n---\nkind: Binding\nmetadata: {name: b1}\nspec: {x: 1, x: 2}\n"
    )
    assert err.document == 3
    assert yamlload.scalar_at(err.root, "kind") == "Binding"
    assert yamlload.scalar_at(err.root, "metadata", "name") == "b1"
    assert yamlload.scalar_at(err.root, "metadata", "labels") is None
    assert yamlload.scalar_at(err.root, "spec") is None  # a mapping, not a scalar


def test_keys_are_compared_as_loaded() -> None:
    assert duplicate("1: a\n0x1: b\n").path == "1"
    assert duplicate("true: a\nyes: b\n").path == "True"
    assert yamlload.load("1: a\n'1': b\n") == {1: "a", "1": "b"}  # int and str differ


def test_a_merge_key_may_be_overridden_and_an_alias_repeated() -> None:
    text = "base: &b {url: x, timeout: 1}\nf:\n  <<: *b\n  url: y\ng: *b\nh: *b\n"
    loaded = yamlload.load(text)
    assert loaded["f"] == {"url": "y", "timeout": 1}
    assert loaded["g"] == loaded["h"] == {"url": "x", "timeout": 1}
    assert duplicate("base: &b {u: 1, u: 2}\nf:\n  <<: *b\n").path == "base.u"


def test_the_settings_file_refuses_a_key_set_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "settings.yaml"
    file.write_text("namespace: one\nport: 8081\nnamespace: two\n", encoding="utf-8")
    monkeypatch.setenv("EVENTHUB_SETTINGS_FILE", str(file))
    with pytest.raises(ValueError, match="namespace: duplicate key") as exc:
        Settings()
    assert str(exc.value) == f"{file}: namespace: duplicate key (set at lines 1 and 3)"
