"""Two processes that exchange tensors point to point over torch.distributed: a process group of
two ranks made outside the default group, so a process may hold several (one per peer) and
still be a rank of its own replica group's groups (parallel/groups.py). Backend as
everywhere: gloo for CPU tensors, NCCL for CUDA ones -- the same calls.

    rank 0:  store = PairGroup.listen(host)          a rendezvous store; tell the peer store.port
             PairGroup(store, 0, backend, host)      blocks until the peer joined
    rank 1:  PairGroup(PairGroup.dial(host, port), 1, backend, my_host)

The constructor ends with a one-element exchange, so a pair that exists has both ranks
connected (NCCL makes its communicator at the first operation: without it the first send,
made on the caller's thread, would wait there for the peer). send() returns at once (the
work completes when the peer receives); recv() blocks up to the timeout; close() ends it. Tags keep concurrent transfers apart on gloo; NCCL matches sends and receives in
order, so a caller that overlaps transfers on one pair must receive in the order it sent.
"""

from __future__ import annotations

import itertools
from datetime import timedelta

import torch
import torch.distributed as dist


class PairGroup:
    def __init__(
        self, store: dist.Store, rank: int, backend: str, host: str, timeout_s: float = 60.0
    ):
        if rank not in (0, 1):
            raise ValueError(f"a pair has ranks 0 and 1, not {rank}")
        self.rank, self.peer = rank, 1 - rank
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.device = torch.device("cuda" if backend == "nccl" else "cpu")
        port = store.port
        store = dist.PrefixStore("pair", store)
        if backend == "gloo":
            self.pg = _gloo(store, rank, host, self.timeout)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
        else:
            raise ValueError(f"backend must be gloo or nccl, not {backend!r}")
        self.id = port  # the rendezvous port: which pair this is, for both ranks
        self._store = store  # the group reads it while it lives
        self._tags = itertools.count(1)
        self._handshake()

    def _handshake(self) -> None:
        one = torch.ones(1, device=self.device)
        if self.rank == 0:
            self.send(one, 0).wait(self.timeout)
        else:
            self.recv(one, 0)

    def close(self) -> None:
        """End the group: a transfer still waiting on it fails instead of running out its
        timeout. Idempotent; errors of a peer already gone are ignored."""
        pg, self.pg = self.pg, None
        if pg is None:
            return
        for end in ("abort", "shutdown"):
            try:
                getattr(pg, end)()
                return
            except Exception:  # not supported by this backend / already broken: drop it
                continue

    def next_tag(self) -> int:
        """A tag no earlier transfer on this pair used (from the sender's side)."""
        return next(self._tags)

    @staticmethod
    def listen(host: str, timeout_s: float = 60.0) -> dist.TCPStore:
        """Rank 0's rendezvous store on `host`, on a port the OS picks (store.port)."""
        return dist.TCPStore(
            host, 0, 2, is_master=True, timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )  # fmt: skip

    @staticmethod
    def dial(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
        return dist.TCPStore(host, port, 2, is_master=False, timeout=timedelta(seconds=timeout_s))

    def send(self, tensor: torch.Tensor, tag: int) -> dist.Work:
        """Start sending `tensor` (on this pair's device; kept alive by the caller until the
        work is done) to the peer."""
        return self.pg.send([tensor], self.peer, tag)

    def recv(self, tensor: torch.Tensor, tag: int) -> torch.Tensor:
        """Receive the peer's tensor with `tag` into `tensor` (same size); blocks."""
        self.pg.recv([tensor], self.peer, tag).wait(self.timeout)
        return tensor


def _gloo(store: dist.Store, rank: int, host: str, timeout: timedelta):
    """A gloo backend whose device listens on `host` (loopback in tests, the node's address
    in a cluster), not on whatever the machine's name resolves to."""
    Gloo = dist.ProcessGroupGloo
    opts = Gloo._Options()
    opts._devices = [Gloo.create_device(hostname=host)]
    opts._threads = 2
    opts._timeout = timeout
    return Gloo(store, rank, 2, opts)
