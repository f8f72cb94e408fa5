"""The conversation's own limits: unique item ids, a bounded number of items, messages() in linear time."""

from __future__ import annotations

import time

import pytest

from brains.history import Conversation, Item


def test_a_duplicate_item_id_is_refused_and_nothing_changes() -> None:
    conv = Conversation()
    conv.add(Item(id="a", role="user", text="one"))
    with pytest.raises(ValueError, match="already exists"):
        conv.add(Item(id="a", role="user", text="two"))
    assert [(i.id, i.text) for i in conv.items] == [("a", "one")]


def test_past_max_items_the_oldest_is_evicted_and_reported() -> None:
    evicted: list[str] = []
    conv = Conversation(max_items=3, on_evict=lambda item: evicted.append(item.id))
    for n in range(5):
        conv.add(Item(id=f"i{n}", role="user", text=str(n)))
    assert [i.id for i in conv.items] == ["i2", "i3", "i4"]
    assert evicted == ["i0", "i1"]
    assert conv.full
    # Inserting after the item that is about to be evicted puts the new one first.
    conv.add(Item(id="x", role="user", text="x"), previous_item_id="i2")
    assert [i.id for i in conv.items] == ["x", "i3", "i4"]
    with pytest.raises(KeyError):
        conv.add(Item(id="y", role="user"), previous_item_id="gone")
    assert [i.id for i in conv.items] == ["x", "i3", "i4"]  # nothing evicted for a bad insert


def test_messages_of_many_function_results_is_not_quadratic() -> None:
    conv = Conversation()
    for n in range(3000):
        conv.add(Item(id=f"c{n}", role="assistant", type="function_call", call_id=f"call{n}", name=f"f{n}"))
        conv.add(Item(id=f"o{n}", role="user", type="function_call_output", call_id=f"call{n}", text="ok"))
    t0 = time.perf_counter()
    messages = conv.messages()
    assert time.perf_counter() - t0 < 1.0  # ~10 ms; the per-output lookup took seconds
    assert messages[-1].content.startswith("f2999 returned: ok")
