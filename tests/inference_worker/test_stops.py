"""Stop strings across streamed pieces."""

from __future__ import annotations

import pytest

from inference_worker.backends.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            break
    out.append(matcher.flush())
    return out, matcher.stopped


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["Hello wor", "ld. END more"], "Hello world. "),
        (["Hello E", "N", "D"], "Hello "),  # split over three pieces
        (["ENDING"], ""),
        (["no stop here"], "no stop here"),
        (["almost EN"], "almost EN"),  # held back, then released at the end
    ],
)
def test_text_is_cut_before_the_first_stop(pieces: list[str], expected: str) -> None:
    out, stopped = run(["END"], pieces)
    assert "".join(out) == expected
    assert stopped == ("END" in "".join(pieces))


def test_the_earliest_of_several_stops_wins() -> None:
    out, _ = run(["b", "aa"], ["xaab"])
    assert "".join(out) == "x"


def test_text_that_may_begin_a_stop_is_held_back_until_known() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("yes </an") == "yes "
    assert matcher.feed("yway") == "</anyway"
