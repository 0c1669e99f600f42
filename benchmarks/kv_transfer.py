"""KV hand-off cost on one node: what a prefill -> decode transfer does to a prompt's blocks,
step by step, through each transport, against a plain memcpy of the same bytes in the same run.

    .venv/bin/python benchmarks/kv_transfer.py [--prompt-tokens 1024] [--rounds 5]

The prefill engine runs in this process, the decode engine in a Ray actor on the node (two
processes, as two groups are). Steps, as the disaggregated path runs them
(cluster/replica_group.py, cluster/kv_handoff.py, cluster/engine.py):
  export   the prefill engine copies the prompt's full blocks out of its paged cache into new
           memory (a group without an arena, or whose arena is full)
  slot     the same export straight into a reserved slot of the prefill group's shared-memory
           arena (cluster/kv_arena.py): what a prefill group with an arena does
  put      copying an export from new memory into an arena slot (the path before `slot`)
  shm      (groups on one node) the decode process imports straight from the slot
  socket   (groups on two nodes) the decode process takes it over the data plane
           (cluster/wire.py call_once: one frame of raw bytes) and imports it
  dist     (pools.kv_transport dist) the decode process receives it over a gloo pair group
           with the prefill process (cluster/kv_transports.py Dist / arrive, parallel/pair.py)
           and imports it; the prefill side's send starts from the export, as take_kv's does
  import   the decode engine writes the blocks into free blocks of its cache (counted inside
           each transport's figure, as the decode group does it)
Baseline: `torch.Tensor.clone()` of a tensor of the same size (one read + one write into fresh
memory, like export). Model: the default SmolLM2-135M (30 layers, 3 KV heads x 64, dtype auto).

Then, with chunked prefill (`--chunk` tokens a step), the export on the hand-off's critical
path (cluster/kv_export.py: what the step that samples the first token spends exporting):
  one-shot     every block copied into the slot at the first token
  pipelined    each chunk's full blocks copied as its step returns, inline
  background   the same on the copier thread, overlapping the next step
and what a transfer adds to the second token: the colocated engine's first decode step (first
token -> second) against the P/D path's export at the hand-off + the decode engine's import
from the slot + its first step (which recomputes the prompt's last partial block). Both
engines run in this process here; the router hop between the legs is not in it
(benchmarks/serving_overhead.py measures that).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import ray
import torch

from cluster import kv_transfer
from cluster.config import CacheConfig, EngineConfig
from cluster.engine import LLMEngine
from workers.sampling_params import SamplingParams


@ray.remote(num_cpus=0)
class Decoder:
    """The decode side in its own process: a decode engine and the arenas it maps."""

    def __init__(self, cfg: EngineConfig):
        from cluster.kv_arena import ArenaMaps

        self.engine = LLMEngine(cfg)
        self.maps = ArenaMaps()

    def _import(self, msg) -> None:
        self.engine.block_manager.reset_prefix_cache()  # so each round imports every block
        tokens, data, _ = kv_transfer.unpack(msg, self.maps)
        assert self.engine.import_kv(tokens, data) == len(tokens)

    def shm(self, msg) -> float:
        t0 = time.perf_counter()
        self._import(msg)
        return time.perf_counter() - t0

    def join(self, port: int) -> None:
        from parallel.pair import PairGroup

        self.pair = PairGroup(PairGroup.dial("127.0.0.1", port), 1, "gloo", "127.0.0.1")

    def dist(self, msg) -> float:
        import asyncio

        from cluster import kv_transports

        if not hasattr(self, "loop"):
            self.loop = asyncio.new_event_loop()
        t0 = time.perf_counter()
        self._import(self.loop.run_until_complete(kv_transports.arrive(msg, self.pair)))
        return time.perf_counter() - t0

    def socket(self, host: str, port: int, secret: bytes) -> float:
        import asyncio

        from cluster import wire

        # Awaited in an event loop that stays, as a decode group does: asyncio.run() per call
        # added ~1 s of its own teardown here after a 46 MB answer (the figure before 12-06).
        if not hasattr(self, "loop"):
            self.loop = asyncio.new_event_loop()
        t0 = time.perf_counter()
        msg = self.loop.run_until_complete(
            wire.call_once(host, port, secret, "bench", "take_kv", ["r"])
        )
        self._import(msg)
        return time.perf_counter() - t0


def serve_inline(payload: dict) -> tuple[str, int, bytes]:
    """A data-plane stand-in in a thread of this process: answers every take_kv with `payload`
    (the prefill group's socket path)."""
    import asyncio
    import threading

    from cluster import wire

    secret = wire.new_secret()
    ready: dict = {}

    async def handler(reader, writer):
        if not await wire.accept(reader, writer, secret):
            return
        await wire.read_to_group(reader)  # the Hello
        while (msg := await wire.read_to_group(reader)) is not None:
            await wire.send_large(writer, wire.Reply(msg.id, payload["msg"]))
        writer.close()

    def run() -> None:
        loop = asyncio.new_event_loop()
        srv = loop.run_until_complete(asyncio.start_server(handler, "127.0.0.1", 0))
        ready["port"] = srv.sockets[0].getsockname()[1]
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    while "port" not in ready:
        time.sleep(0.01)
    return "127.0.0.1", ready["port"], secret


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=256, help="prefill tokens a step (pipelined)")
    ap.add_argument("--skip-transports", action="store_true", help="only the pipelined part")
    args = ap.parse_args()
    if not args.skip_transports:
        transports(args)
    pipelined(args)


def transports(args) -> None:
    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=512))
    prefill = LLMEngine(cfg)
    prompt = [100 + (31 * i) % 40000 for i in range(args.prompt_tokens)]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    rid = prefill.add_request(prompt, params, handoff=True)
    while prefill.has_unfinished():
        outs = [o for o in prefill.step() if o.request_id == rid]
    tokens, data = outs[-1].kv
    # the same blocks, now in the prefill engine's prefix cache (a lookup leaves the last out)
    blocks = list(prefill.block_manager.find_cached_prefix(tokens))
    tokens = tokens[: len(blocks) * cfg.cache.block_size]
    data = data[:, :, : len(blocks)]
    nbytes = data.numel() * data.element_size()

    import asyncio

    from cluster import kv_transports
    from cluster.kv_arena import KVArena
    from parallel.pair import PairGroup

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    dec = Decoder.remote(cfg)
    store = PairGroup.listen("127.0.0.1")
    joined = dec.join.remote(store.port)
    pair = PairGroup(store, 0, "gloo", "127.0.0.1")
    ray.get(joined)
    loop = asyncio.new_event_loop()

    async def send_dist(out: torch.Tensor) -> dict:
        return kv_transports.Dist(pair).send("r", tokens, out, layout)

    arena = KVArena("bench", 2 * nbytes + (1 << 20))
    layout = prefill.kv_layout
    payload: dict = {}
    host, port, secret = serve_inline(payload)

    names = ("export", "slot", "put", "shm", "socket", "dist", "memcpy")
    rows: dict[str, list[float]] = {k: [] for k in names}
    for i in range(args.rounds + 1):  # the first round warms both sides up: not counted
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        out = prefill.executor.export_blocks(blocks)
        t["export"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        arena.put("old", out)
        t["put"] = time.perf_counter() - t0
        arena.release("old")
        t0 = time.perf_counter()
        slot = arena.reserve("r", tuple(out.shape), out.dtype)
        got = prefill.executor.export_blocks(blocks, slot)
        t["slot"] = time.perf_counter() - t0
        assert got.data_ptr() == slot.data_ptr() and torch.equal(got, out)
        msg = kv_transfer.pack(tokens, slot, layout, (arena.path, *arena.where("r")))
        t["shm"] = ray.get(dec.shm.remote(msg))
        arena.release("r")
        payload["msg"] = kv_transfer.pack(tokens, out, layout)
        t["socket"] = ray.get(dec.socket.remote(host, port, secret))
        t["dist"] = ray.get(dec.dist.remote(loop.run_until_complete(send_dist(out))))
        t0 = time.perf_counter()
        data.clone()
        t["memcpy"] = time.perf_counter() - t0
        if i:
            for k in names:
                rows[k].append(t[k])
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"{len(tokens)} prompt tokens in {len(blocks)} blocks: {nbytes / 1e6:.1f} MB of KV "
        f"({data.dtype}), median of {args.rounds} rounds"
    )
    for k in names:
        print(f"  {k:7s} {med[k] * 1e3:8.2f} ms  {nbytes / med[k] / 1e9:6.2f} GB/s")
    paths = {
        "slot + shm (one node, now)": ("slot", "shm"),
        "export + put + shm (one node, before)": ("export", "put", "shm"),
        "export + socket (two nodes)": ("export", "socket"),
        "export + dist (gloo pair group)": ("export", "dist"),
    }
    for name, steps in paths.items():
        total = sum(med[k] for k in steps)
        print(
            f"  {name:38s} {total * 1e3:8.2f} ms  {nbytes / total / 1e9:6.2f} GB/s = "
            f"{med['memcpy'] / total:.0%} of memcpy's rate"
        )


def _prefill(engine: LLMEngine, prompt: list[int]) -> tuple[float, float, Any]:
    """One hand-off request from an empty prefix cache: (seconds to the hand-off, seconds its
    export spent on the hand-off's critical path, the hand-off output)."""
    engine.block_manager.reset_prefix_cache()
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, params, handoff=True)
    out = None
    while out is None:
        out = next((o for o in engine.step() if o.request_id == rid and o.finished), None)
    return time.perf_counter() - t0, engine.kv_export.last_finish_s, out


def _decode_leg(engine: LLMEngine, maps: Any, msg: dict, prompt: list[int], first: list[int]):
    """A decode leg: import from the slot `msg` names, then run until the second token;
    (import s, first step s, the tokens)."""
    engine.block_manager.reset_prefix_cache()  # so each round imports every block
    t0 = time.perf_counter()
    tokens, data, _ = kv_transfer.unpack(msg, maps)
    assert engine.import_kv(tokens, data) == len(tokens)
    t1 = time.perf_counter()
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    rid = engine.add_request(prompt, params, resume_output_ids=first)
    while engine.has_unfinished():
        outs = [o for o in engine.step() if o.request_id == rid]
    return t1 - t0, time.perf_counter() - t1, outs[-1].token_ids


def pipelined(args) -> None:
    from cluster.config import SchedulerConfig
    from cluster.kv_arena import ArenaMaps, KVArena

    sched = SchedulerConfig(max_num_batched_tokens=args.chunk)
    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=512), scheduler=sched)
    prompt = [100 + (31 * i) % 40000 for i in range(args.prompt_tokens)]
    prefill = LLMEngine(cfg)
    arena = KVArena("bench-pipe", 256 << 20)
    prefill.kv_export.target = arena
    colocated = LLMEngine(cfg)
    # The decode engine runs in this process too (it reads the slot through its own mapping,
    # as a decode group does): in a Ray actor on a loaded 2-core machine its first step took
    # 0.12-0.94 s against the colocated engine's 66-73 ms, which says nothing of the transfer.
    decode, maps = LLMEngine(cfg), ArenaMaps()
    modes = {"one-shot": (False, False), "pipelined": (True, False), "background": (True, True)}
    rows: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    second: dict[str, list[float]] = {"colocated": [], "import": [], "decode step": []}
    ref = None
    for i in range(args.rounds + 1):  # the first round warms up: not counted
        for mode, (pipe, background) in modes.items():
            prefill.kv_export.pipelined, prefill.kv_export.background = pipe, background
            wall, export_s, out = _prefill(prefill, prompt)
            tokens, data = out.kv
            if ref is None:
                ref = data.clone()
            assert torch.equal(data, ref), mode  # every mode exports the same bytes
            if mode == "background":  # the P/D decode leg, from this slot
                msg = kv_transfer.pack(tokens, data, prefill.kv_layout,
                                       (arena.path, *arena.where(out.request_id)))  # fmt: skip
                imp, step, ids = _decode_leg(decode, maps, msg, prompt, out.token_ids)
                if i:
                    second["import"].append(imp)
                    second["decode step"].append(step)
            arena.release(out.request_id)
            if i:
                rows[mode].append((wall, export_s))
        colocated.block_manager.reset_prefix_cache()
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        rid = colocated.add_request(prompt, params)
        stamps, last = [], None
        while colocated.has_unfinished():
            for o in colocated.step():
                if o.request_id == rid:
                    stamps.append(time.perf_counter())
                    last = o
        assert last.token_ids == ids, "P/D and colocated disagree on the first two tokens"
        if i:
            second["colocated"].append(stamps[1] - stamps[0])

    med = statistics.median
    n = len(prompt) // 16
    print(
        f"\n{len(prompt)} prompt tokens ({n} full blocks), chunked prefill of {args.chunk} "
        f"tokens a step, median of {args.rounds} rounds"
    )
    print(f"  {'export mode':12s} {'at hand-off ms':>15s} {'prefill wall ms':>16s}")
    for mode, r in rows.items():
        print(f"  {mode:12s} {med(x[1] for x in r) * 1e3:15.2f} {med(x[0] for x in r) * 1e3:16.1f}")
    colo = med(second["colocated"])
    hand = med(x[1] for x in rows["background"])
    imp, step = med(second["import"]), med(second["decode step"])
    pd = hand + imp + step
    print("  first token -> second token:")
    print(f"    colocated (one decode step)                  {colo * 1e3:8.1f} ms")
    print(f"    P/D: export at hand-off {hand * 1e3:.1f} + import {imp * 1e3:.1f} + "
          f"first decode step {step * 1e3:.1f} = {pd * 1e3:8.1f} ms "
          f"(the transfer: {(hand + imp) / pd:.0%} of it)")  # fmt: skip


if __name__ == "__main__":
    main()
