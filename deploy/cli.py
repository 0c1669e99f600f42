"""The `flotilla` command.

flotilla serve [--config cfg.yaml] [--model M] [--groups N] [--policy P]
    start (or join) a Ray cluster, run the Serve app, print how to call it, block until
    Ctrl-C, then shut Serve down.
flotilla generate "prompt" [--stream] [--max-tokens N] [--temperature T] [--chat]
                  [--address 127.0.0.1:9000]
    one request over gRPC (needs only grpcio and the generated stubs; no Ray import).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def _load_config(args: argparse.Namespace):
    from deploy.config import FlotillaConfig

    cfg = FlotillaConfig.from_yaml(args.config) if args.config else FlotillaConfig()
    data: dict[str, Any] = cfg.model_dump()
    if args.model:
        data["engine"]["model"]["model"] = args.model
    if args.groups:
        data["groups"] = args.groups
    if args.policy:
        data["router"]["policy"] = args.policy
    return FlotillaConfig.model_validate(data)


def usage_text(cfg) -> str:
    s, model = cfg.serve, cfg.model_name
    http = f"http://{s.host}:{s.http_port}"
    grpc_addr = f"127.0.0.1:{s.grpc_port}"
    return f"""
Flotilla is serving {model!r} on {cfg.groups} replica group(s), routing {cfg.router.policy}.

  gRPC (flotilla.v1.Flotilla on {grpc_addr}):
    flotilla generate "Tell me a joke" --stream --max-tokens 64 --address {grpc_addr}
  HTTP (OpenAI-compatible on {http}):
    curl {http}/v1/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 32}}'
    curl -N {http}/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}], "stream": true}}'
  openai client:
    python -c "import openai; c = openai.OpenAI(base_url='{http}/v1', api_key='-'); \\
print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi!'}}]).choices[0].message.content)"
  health / models: curl {http}/health ; curl {http}/v1/models
  metrics (Prometheus, ray_flotilla_*): {_metrics_url(cfg)}

Ctrl-C stops the server.
"""


def _metrics_url(cfg) -> str:
    port = cfg.serve.metrics_export_port
    return f"http://127.0.0.1:{port}/metrics" if port else "the Ray node's metrics export port"


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    import ray
    from ray import serve

    from deploy import app

    init: dict[str, Any] = {"address": cfg.serve.ray_address}
    if cfg.serve.ray_address is None:
        init["runtime_env"] = app.runtime_env(cfg)
        if cfg.serve.metrics_export_port:
            init["_metrics_export_port"] = cfg.serve.metrics_export_port
    ray.init(**init)
    print(f"starting {cfg.groups} replica group(s) of {cfg.model_name!r} ...", flush=True)
    try:
        app.start(cfg)
        print(usage_text(cfg), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from router.proto import flotilla_pb2 as pb
    from router.proto import flotilla_pb2_grpc as pb_grpc

    params = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        req = pb.GenerateRequest(
            messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=args.prompt)]),
            params=params,
        )
    else:
        req = pb.GenerateRequest(prompt=args.prompt, params=params)
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.FlotillaStub(channel)
        try:
            if args.stream:
                usage = None
                for msg in stub.GenerateStream(req, timeout=args.timeout):
                    print(msg.text, end="", flush=True)
                    if msg.HasField("usage"):
                        usage, reason = msg.usage, msg.finish_reason
                print()
                if usage is not None:
                    print(
                        f"[{reason}; {usage.prompt_tokens} prompt + {usage.completion_tokens} "
                        "completion tokens]",
                        file=sys.stderr,
                    )
            else:
                resp = stub.Generate(req, timeout=args.timeout)
                print(resp.text)
                print(
                    f"[{resp.finish_reason}; {resp.usage.prompt_tokens} prompt + "
                    f"{resp.usage.completion_tokens} completion tokens]",
                    file=sys.stderr,
                )
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flotilla", description="Flotilla LLM serving on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the Serve app (gRPC + OpenAI HTTP) until Ctrl-C")
    s.add_argument("--config", help="YAML file (deploy/examples/default.yaml shows every section)")
    s.add_argument("--model", help="override engine.model.model")
    s.add_argument("--groups", type=int, help="override groups")
    s.add_argument("--policy", choices=["round_robin", "power_of_two", "prefix_aware"])
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="one request over gRPC")
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--address", default="127.0.0.1:9000", help="host:port of the gRPC proxy")
    g.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    g.set_defaults(func=cmd_generate)

    from deploy.bench.cli import register as register_bench  # `flotilla bench` (deploy/bench/)

    register_bench(sub)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
