"""The native step's thread policy: every thread on a quiet machine, the cores other processes
leave free (at least one) on a busy one, looked at once per interval."""
from __future__ import annotations

import pytest

from llmc.runtime import threads as th


@pytest.fixture
def machine(monkeypatch):
    """A 2-core machine whose clock and CPU counters the test advances."""
    m = {"now": 100.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(th.time, "monotonic", lambda: m["now"])
    monkeypatch.setattr(th, "_machine_busy_s", lambda: m["busy"])
    monkeypatch.setattr(th, "_own_busy_s", lambda: m["own"])

    def advance(seconds: float, own_cores: float, other_cores: float) -> None:
        m["now"] += seconds
        m["own"] += own_cores * seconds
        m["busy"] += (own_cores + other_cores) * seconds
    policy = th.ThreadPolicy(interval=0.25)
    policy.cores = 2
    return policy, advance


def test_quiet_machine_uses_every_thread(machine):
    policy, advance = machine
    assert policy.threads(2) == 2
    for _ in range(5):
        advance(0.3, own_cores=2.0, other_cores=0.05)
        assert policy.threads(2) == 2
    assert policy.reduced_steps == 0


def test_busy_machine_uses_the_free_cores_then_all_again(machine):
    policy, advance = machine
    policy.threads(2)
    advance(0.3, own_cores=1.0, other_cores=1.0)          # two busy loops beside us
    assert policy.threads(2) == 1
    advance(0.1, own_cores=1.0, other_cores=1.3)          # within the interval: not looked at again
    assert policy.threads(2) == 1
    advance(0.3, own_cores=0.7, other_cores=1.3)
    assert policy.threads(2) == 1                         # never fewer than one
    advance(0.3, own_cores=2.0, other_cores=2.0)          # steal or others saturating: still one
    assert policy.threads(2) == 1
    advance(0.3, own_cores=1.0, other_cores=0.0)          # they stopped
    assert policy.threads(2) == 2
    assert policy.threads(1) == 1                         # never more than asked
    assert policy.reduced_steps == 4
