"""The binary-mode headers a connector works out for its events are the ones the event itself
would give: connectors set them once, ``Event.binary_headers`` is the reference."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.common import Rejected, sendable
from eventhub.events import Event

NAMES = st.text(alphabet="abcdefxyz019", min_size=1, max_size=8)
VALUES = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=20),  # UTF-8: checked before
    st.text(alphabet='!#$%&"/:;=?@[]~ -.,_azAZ09', max_size=20),
    st.sampled_from(["application/json; charset=utf-8", "mqtt://h/a b", "100%", 'say "hi"']),
)


@given(attributes=st.dictionaries(st.one_of(NAMES, st.just("datacontenttype")), VALUES))
def test_the_headers_set_once_are_those_of_the_event(attributes: dict[str, str]) -> None:
    event = Event(attributes, b"{}")
    sent = sendable(attributes, b"{}")
    assert sent.binary_headers() == event.binary_headers()
    assert sent == event  # the same event: attributes and data


def test_text_that_is_not_utf8_is_rejected_naming_the_attribute() -> None:
    for attributes in ({"id": "1", "x\udcff": "v"}, {"id": "1", "x": "v\udcff"}):
        with pytest.raises(Rejected, match="invalid-attribute: x"):
            sendable(attributes, b"")
