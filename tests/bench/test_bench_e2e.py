"""`flotilla bench` end to end against a real Serve app: one Ray cluster, one replica group of
the tiny seeded Llama, gRPC on 19140 and HTTP on 18140 (loopback; other modules use other
ports). Token counts are checked against counts taken independently -- a stub generated from
our .proto and the official `openai` client -- and against what the workload asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import openai
import pytest

from deploy.bench.workloads import LengthDist, Vocab, WorkloadConfig, build
from deploy.config import FlotillaConfig
from router.proto import flotilla_pb2 as pb
from router.proto import flotilla_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

HTTP_PORT, GRPC_PORT = 18140, 19140
MAX_MODEL_LEN = 256
SLO_TTFT_MS, SLO_ITL_MS = 1500.0, 300.0
# long-mix: 12 requests, the long ones (400 tokens) over max_model_len -> refused by the server.
WORKLOAD = [
    "--workload", "long-mix", "--num-requests", "12", "--input-len", "uniform:8,24",
    "--output-len", "uniform:3,8", "--long-input-len", "400", "--long-fraction", "0.3",
    "--seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def served(model_dir):
    import ray

    from deploy.app import runtime_env, start

    cfg = FlotillaConfig.model_validate(
        {
            "engine": {
                "model": {
                    "model": model_dir,
                    "dtype": "float32",
                    "max_model_len": MAX_MODEL_LEN,
                    "num_threads": 1,
                },
                "cache": {"block_size": 8, "num_blocks": 512},
                "scheduler": {"max_num_seqs": 4, "max_waiting": 64},
            },
            "groups": 1,
            "serve": {"http_port": HTTP_PORT, "grpc_port": GRPC_PORT, "group_num_cpus": 0.5},
        }
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env(cfg))
    try:
        start(cfg)
        yield cfg
    finally:
        # ray.shutdown() ends the local cluster's every process; serve.shutdown() first would
        # only add seconds of graceful draining. Drop the cached Serve client with it.
        from ray.serve.context import _set_global_client

        ray.shutdown()
        _set_global_client(None)


def _bench(tmp: Path, endpoint: str, model_dir: str, *extra: str) -> dict:
    from deploy.cli import main

    argv = ["bench", "--endpoint", endpoint, "--tokenizer", model_dir, "--out", str(tmp)]
    argv += ["--slo-ttft-ms", str(SLO_TTFT_MS), "--slo-itl-ms", str(SLO_ITL_MS), "--no-progress"]
    assert main(argv + list(extra)) == 0
    assert (tmp / "latency_cdf.png").stat().st_size > 0
    return json.loads((tmp / "results.json").read_text())


def _specs(model_dir: str, seed: int = 3):
    cfg = WorkloadConfig(
        kind="long-mix",
        num_requests=12,
        input_len=LengthDist("uniform", 8, 24),
        output_len=LengthDist("uniform", 3, 8),
        long_input_len=LengthDist("fixed", 400),
        long_fraction=0.3,
        seed=seed,
    )
    return build(cfg, Vocab.from_tokenizer(model_dir))


def _check_run(run: dict, specs, refused_code: str) -> None:
    s, reqs = run["summary"], {r["index"]: r for r in run["requests"]}
    long = [sp.index for sp in specs if sp.input_len > MAX_MODEL_LEN]
    assert 0 < len(long) < len(specs)  # the seed gives both kinds
    # Every refusal is counted under the server's own code; nothing else failed.
    assert s["errors"] == {refused_code: len(long)}
    assert s["failed"] == len(long) and s["completed"] == len(specs) - len(long)
    assert sorted(i for i, r in reqs.items() if not r["ok"]) == long
    assert (
        "max_model_len" in s["error_samples"][refused_code]
        or "prompt" in (s["error_samples"][refused_code])
    )
    ok = [sp for sp in specs if sp.index not in long]
    # EOS ignored: each request streams exactly what it asked for, and usage agrees.
    for sp in ok:
        r = reqs[sp.index]
        assert r["output_tokens"] == sp.max_tokens == r["usage_completion_tokens"]
        assert r["finish_reason"] == "length" and len(r["chunk_times"]) <= sp.max_tokens
    assert s["output_tokens"] == sum(sp.max_tokens for sp in ok) and s["usage_mismatches"] == 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        d = s[key]
        assert 0 <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"], (key, d)
    assert s["ttft_ms"]["max"] <= s["e2e_ms"]["max"]
    assert s["output_token_throughput"] == pytest.approx(s["output_tokens"] / s["duration_s"])
    # Goodput recomputed here from the raw records: mean ITL = (last - first chunk) / tokens
    # after the first chunk (requests with none pass the ITL check).
    good = 0
    for r in reqs.values():
        if not r["ok"] or 1000 * r["ttft"] > SLO_TTFT_MS:
            continue
        first = r["chunk_tokens"][0] if r["chunk_tokens"] else 1
        after = r["output_tokens"] - first if r["chunk_tokens"] else len(r["chunk_times"]) - 1
        span = r["chunk_times"][-1] - r["chunk_times"][0]
        good += after == 0 or 1000 * span / after <= SLO_ITL_MS
    assert s["goodput"]["good"] == good
    assert s["goodput"]["goodput_rps"] == pytest.approx(good / s["duration_s"])


def test_grpc_long_mix_counts_tokens_and_errors(served, model_dir, tmp_path):
    doc = _bench(tmp_path, f"grpc://127.0.0.1:{GRPC_PORT}", model_dir, "--concurrency", "3",
                 *WORKLOAD)  # fmt: skip
    assert doc["meta"]["model"] == served.model_name and len(doc["runs"]) == 1
    run, specs = doc["runs"][0], _specs(model_dir)
    _check_run(run, specs, "INVALID_ARGUMENT")
    assert all(r["tokens_source"] == "ids" for r in run["requests"])
    # Independent count: the same prompts through our own generated stub.
    reqs = {r["index"]: r for r in run["requests"]}
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = pb_grpc.FlotillaStub(channel)
        for sp in [sp for sp in specs if reqs[sp.index]["ok"]][:3]:
            req = pb.GenerateRequest(
                prompt_token_ids=pb.TokenIds(ids=sp.prompt_ids),
                params=pb.SamplingParams(max_tokens=sp.max_tokens, temperature=0, ignore_eos=True),
            )
            msgs = list(stub.GenerateStream(req, timeout=60))
            assert sum(len(m.token_ids) for m in msgs) == reqs[sp.index]["output_tokens"]
            assert msgs[-1].usage.prompt_tokens == reqs[sp.index]["usage_prompt_tokens"]


def test_http_sweep_counts_tokens_and_errors(served, model_dir, tmp_path):
    endpoint = f"http://127.0.0.1:{HTTP_PORT}"
    doc = _bench(tmp_path, endpoint, model_dir, "--rates", "8,inf", *WORKLOAD)
    assert [r["load"]["rate"] for r in doc["runs"]] == [8.0, "inf"]
    assert (tmp_path / "throughput_vs_rate.png").stat().st_size > 0
    for i, run in enumerate(doc["runs"]):
        specs = _specs(model_dir, seed=3 + i)  # each sweep point draws fresh prompts
        _check_run(run, specs, "HTTP 400")
        assert all(r["tokens_source"] == "usage" for r in run["requests"] if r["ok"])
    # Independent count: the official openai client streaming the first point's prompts.
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="-", max_retries=0, timeout=60)
    reqs = {r["index"]: r for r in doc["runs"][0]["requests"]}
    for sp in [sp for sp in _specs(model_dir) if reqs[sp.index]["ok"]][:2]:
        chunks = list(
            client.completions.create(
                model=served.model_name,
                prompt=list(sp.prompt_ids),
                max_tokens=sp.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        assert chunks[-1].usage.completion_tokens == reqs[sp.index]["output_tokens"]


def test_chat_workload_over_both_apis(served, model_dir, tmp_path):
    args = ["--workload", "chat", "--num-requests", "6", "--turns", "2", "--prefix-len", "24",
            "--input-len", "6", "--output-len", "4", "--concurrency", "2", "--no-plots"]  # fmt: skip
    for name, endpoint in (("grpc", f"grpc://127.0.0.1:{GRPC_PORT}"),
                           ("http", f"http://127.0.0.1:{HTTP_PORT}")):  # fmt: skip
        from deploy.cli import main

        out = tmp_path / name
        argv = ["bench", "--endpoint", endpoint, "--tokenizer", model_dir, "--out", str(out)]
        assert main(argv + args + ["--no-progress"]) == 0
        s = json.loads((out / "results.json").read_text())["runs"][0]["summary"]
        assert s["completed"] == 6 and s["errors"] == {} and s["output_tokens"] == 24
        assert s["input_tokens"] > 6 * 24  # the server's count: template + shared prefix
        assert not (out / "latency_cdf.png").exists()
