"""KV hand-off cost on one node: what a prefill -> decode transfer does to a prompt's blocks,
step by step, against a plain memcpy of the same bytes in the same run.

    .venv/bin/python benchmarks/kv_transfer.py [--prompt-tokens 1024] [--rounds 5]

Steps, as the disaggregated path runs them (cluster/replica_group.py, cluster/engine.py):
  export   the prefill engine copies the prompt's full blocks out of its paged cache
  put+get  the copy crosses processes through Ray's object store (a Serve response is one) in
           cluster.kv_transfer's numpy form: put in the prefill process, get (and one read of
           every byte, as the import does) in another actor on the node
  import   the decode engine writes them into free blocks of its cache
Baseline: `torch.Tensor.clone()` of a tensor of the same size (one read + one write, like
export). Model: the default SmolLM2-135M (30 layers, 3 KV heads x 64, dtype auto).
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

from cluster import kv_transfer
from cluster.config import CacheConfig, EngineConfig
from cluster.engine import LLMEngine
from workers.sampling_params import SamplingParams


@ray.remote(num_cpus=0)
class Receiver:
    def take(self, refs):
        t0 = time.perf_counter()
        tokens, data, _ = kv_transfer.unpack(ray.get(refs[0]))
        return time.perf_counter() - t0, float(data.sum())  # read every byte, as import does


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=512))
    prefill, decode = LLMEngine(cfg), LLMEngine(cfg)
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

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    recv = Receiver.remote()
    ray.get(
        recv.take.remote([ray.put(kv_transfer.pack([], torch.zeros(1), prefill.kv_layout))])
    )  # start it

    rows = {"export": [], "put": [], "get": [], "import": [], "memcpy": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        out = prefill.executor.export_blocks(blocks)
        rows["export"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = ray.put(kv_transfer.pack(tokens, out, prefill.kv_layout))
        rows["put"].append(time.perf_counter() - t0)
        get_s, _ = ray.get(recv.take.remote([ref]))
        rows["get"].append(get_s)
        del ref
        t0 = time.perf_counter()
        decode.import_kv(tokens, out)
        rows["import"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        data.clone()
        rows["memcpy"].append(time.perf_counter() - t0)
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in rows.items()}
    total = med["export"] + med["put"] + med["get"] + med["import"]
    print(
        f"{len(tokens)} prompt tokens in {len(blocks)} blocks: {nbytes / 1e6:.1f} MB of KV "
        f"({data.dtype}), median of {args.rounds} rounds"
    )
    for k in ("export", "put", "get", "import", "memcpy"):
        print(f"  {k:7s} {med[k] * 1e3:8.2f} ms  {nbytes / med[k] / 1e9:6.2f} GB/s")
    print(
        f"  total   {total * 1e3:8.2f} ms  {nbytes / total / 1e9:6.2f} GB/s = "
        f"{med['memcpy'] / total:.0%} of memcpy's rate"
    )


if __name__ == "__main__":
    main()
