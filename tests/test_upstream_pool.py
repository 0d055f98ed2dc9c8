"""UpstreamPool: which replica the gateway sends the next request to."""

from __future__ import annotations

from tunedesk.serve.engines.upstreams import UpstreamPool


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fewest_in_flight_first_and_ties_taken_in_turn():
    pool = UpstreamPool(["http://a:1/v1", "http://b:2/", "http://c:3"], clock=Clock())
    a, b, c = pool.upstreams
    assert [u.url for u in pool.upstreams] == ["http://a:1", "http://b:2", "http://c:3"]
    picks = [pool.pick() for _ in range(6)]
    assert {u.url for u in picks[:3]} == {a.url, b.url, c.url}  # all idle: each in turn
    assert picks[:3] == picks[3:]
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    assert pool.pick() is b and pool.pick(exclude=[b]) is c


def test_a_replica_marked_down_is_skipped_until_its_time_is_up():
    clock = Clock()
    pool = UpstreamPool(["http://a:1", "http://b:2"], down_for_s=5.0, clock=clock)
    a, b = pool.upstreams
    pool.mark_down(a, "ClientConnectorError")
    assert not pool.is_up(a) and a.last_error == "ClientConnectorError"
    assert all(pool.pick() is b for _ in range(4))
    assert pool.pick(exclude=[b]) is a  # down, but the only one left untried: try it
    assert pool.pick(exclude=[a, b]) is None
    clock.now += 5.0
    assert pool.is_up(a) and {pool.pick().url for _ in range(2)} == {a.url, b.url}


def test_when_every_replica_is_down_the_first_to_come_back_is_tried():
    clock = Clock()
    pool = UpstreamPool(["http://a:1", "http://b:2"], down_for_s=5.0, clock=clock)
    a, b = pool.upstreams
    pool.mark_down(b, "x")
    clock.now += 1.0
    pool.mark_down(a, "x")
    assert pool.pick() is b
    pool.mark_up(b)
    assert pool.is_up(b) and b.last_error == ""


def test_a_replica_answering_5xx_again_and_again_is_ejected_then_on_probation():
    clock = Clock()
    pool = UpstreamPool(["http://a:1", "http://b:2"], down_for_s=5.0, clock=clock, eject_after=3)
    a, b = pool.upstreams
    # Errors broken by a good answer don't add up.
    assert [pool.answered(a, s) for s in (500, 503, 200, 502, 500)] == [False] * 5
    assert pool.answered(a, 504) is True  # third 5xx in a row
    assert a.last_error.startswith("answered 504") and pool.is_up(a)  # reachable, yet out
    assert all(pool.pick() is b for _ in range(4))
    assert pool.pick(exclude=[b]) is a  # the only one left untried: tried anyway
    pool.mark_up(a)  # it accepted a connection: still ejected, and still says why
    assert pool.pick() is b and a.last_error.startswith("answered 504")
    # 4xx is the client's doing, not the replica's.
    assert [pool.answered(b, 429) for _ in range(5)] == [False] * 5
    clock.now += 5.0
    assert {pool.pick().url for _ in range(2)} == {a.url, b.url}  # back in rotation
    assert pool.answered(a, 500) is True  # on probation: one more 5xx ejects it again
    clock.now += 5.0
    assert pool.answered(a, 200) is False and a.failures_in_a_row == 0  # a good answer clears it
    assert [pool.answered(a, 500) for _ in range(3)] == [False, False, True]
