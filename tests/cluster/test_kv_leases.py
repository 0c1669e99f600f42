"""A prefill group's KV leases: taken once by the decode group, or expired."""

from __future__ import annotations


def test_kv_leases_are_taken_once_or_expire(monkeypatch):
    from cluster import replica_group

    now = [100.0]
    monkeypatch.setattr(replica_group.time, "monotonic", lambda: now[0])
    leases = replica_group._Leases(lease_s=30)
    leases.put("a", "kv-a")
    leases.put("b", "kv-b")
    assert leases.take("a") == "kv-a" and leases.take("a") is None  # taken = acknowledged
    now[0] += 31
    assert leases.take("b") is None  # expired before it was taken
    assert (leases.taken, leases.expired, len(leases.items)) == (1, 1, 0)
