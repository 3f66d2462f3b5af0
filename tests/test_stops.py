"""Stop strings on decoded text: across token boundaries, held back while streaming, never returned."""

from __future__ import annotations

import pytest

from logitlab.decoding.stops import StopStringMatcher


def run(pieces, stops):
    m = StopStringMatcher(stops)
    out = []
    for p in pieces:
        out.append(m.feed(p))
        if m.stopped:
            break
    else:
        out.append(m.flush())
    return out, m.stopped


def test_stop_split_across_pieces_is_removed_with_everything_after():
    out, stopped = run(["Hello", " wor", "ld E", "N", "D and more"], ["END"])
    assert stopped and "".join(out) == "Hello world "


def test_streamed_text_never_contains_a_partial_stop():
    out, stopped = run(["a\n", "\nb"], ["\n\n"])
    assert stopped and "".join(out) == "a"
    # the "\n" that might start the stop was held back, not emitted early
    assert out[0] == "a"


def test_false_start_is_released():
    out, stopped = run(["ab", "c", "x", "y"], ["abd"])
    assert not stopped and "".join(out) == "abcxy"


def test_earliest_of_several_stops_wins():
    out, stopped = run(["one two three"], ["three", "two"])
    assert stopped and "".join(out) == "one "


@pytest.mark.parametrize("pieces", [["xxSTOP"], ["xxS", "TOP"], ["x", "x", "S", "T", "O", "P"]])
def test_segmentation_does_not_matter(pieces):
    out, stopped = run(pieces, ["STOP"])
    assert stopped and "".join(out) == "xx"


def test_no_stops_emits_immediately():
    m = StopStringMatcher([])
    assert m.feed("abc") == "abc" and m.feed("d") == "d" and not m.stopped


def test_check_false_only_appends():
    m = StopStringMatcher(["ab"])
    assert m.feed("ab", check=False) == "a"  # the possible start of a stop is still held back
    assert not m.stopped
    assert m.flush() == "b"
