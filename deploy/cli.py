"""The `flotilla` command.

flotilla --version
flotilla serve [--config cfg.yaml] [--model M] [--served-model-name NAME] [--groups N]
               [--policy P] [--host H] [--http-port P] [--grpc-port P] [--tp N] [--pp N]
               [--max-model-len N] [--dtype D]
    each flag overrides one field of the YAML (which stays the full form; see _FLAGS), then
    check the config (exit 2 naming the field and the numbers if it cannot be served), start
    (or join) a Ray cluster, run the Serve app, print how to call it, block until Ctrl-C or
    SIGTERM, then drain (refuse new requests, let running ones finish for
    serve.drain_timeout_s) and delete only this app (and the cluster, if it started it).
flotilla build CONFIG -o serve.yaml
    the config as a plain Ray Serve config (`serve deploy`, KubeRay's serveConfigV2).
flotilla deploy CONFIG --address HOST:PORT [--dashboard-address URL] [--dry-run] [--timeout S]
flotilla status --address HOST:PORT [--app NAME]
flotilla delete --address HOST:PORT [--app NAME]
    onto / about an existing Ray cluster, declaratively (deploy/remote.py). A cluster with token
    auth needs RAY_AUTH_MODE=token here and its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token): Ray sends a token to an explicit address only in token mode.
flotilla generate "prompt" [--stream] [--max-tokens N] [--temperature T] [--chat]
                  [--address 127.0.0.1:9000 | --http http://127.0.0.1:8000 [--model M]]
    one request to a running server: over gRPC (needs only grpcio and the generated stubs; no
    Ray import), or with --http through its OpenAI-compatible API (deploy/generate_http.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

# `flotilla serve` flag -> (the config field it overrides, argparse type). Values are checked
# by the config itself, so a bad one fails like the same value in the YAML: exit 2 naming the
# field (types only catch what is not even a number).
_FLAGS: dict[str, tuple[str, type]] = {
    "model": ("engine.model.model", str),
    "served_model_name": ("engine.model.served_name", str),
    "groups": ("groups", int),
    "policy": ("router.policy", str),
    "host": ("serve.host", str),
    "http_port": ("serve.http_port", int),
    "grpc_port": ("serve.grpc_port", int),
    "tp": ("engine.parallel.tp", int),
    "pp": ("engine.parallel.pp", int),
    "max_model_len": ("engine.model.max_model_len", int),
    "dtype": ("engine.model.dtype", str),
}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        field: getattr(args, dest)
        for dest, (field, _) in _FLAGS.items()
        if getattr(args, dest, None) is not None
    }


def _config_failed(e: Exception) -> int:
    print("flotilla: the config cannot be served:", file=sys.stderr)
    for line in str(e).splitlines():
        print(f"  - {line}", file=sys.stderr)
    return 2


def usage_text(cfg) -> str:
    s, model = cfg.serve, cfg.model_name
    http = f"http://{s.host}:{s.http_port}"
    grpc_addr = f"{s.host}:{s.grpc_port}"
    return f"""
Flotilla is serving {model!r} on {_layout(cfg)}, routing {cfg.router.policy}.

  gRPC (flotilla.v1.Flotilla on {grpc_addr}):
    flotilla generate "Tell me a joke" --stream --max-tokens 64 --address {grpc_addr}
  HTTP (OpenAI-compatible on {http}):
    flotilla generate "Tell me a joke" --stream --max-tokens 64 --http {http}
    curl {http}/v1/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 32}}'
    curl -N {http}/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}], "stream": true}}'
  openai client:
    python -c "import openai; c = openai.OpenAI(base_url='{http}/v1', api_key='-'); \\
print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi!'}}]).choices[0].message.content)"
  health / models: curl {http}/health ; curl {http}/v1/models
  tokens: curl {http}/tokenize -H 'Content-Type: application/json' -d '{{"prompt": "Hi"}}'
  metrics (Prometheus, ray_flotilla_*): {_metrics_url(cfg)} (this router's: {http}/metrics)

Ctrl-C stops the server.
"""


def _layout(cfg) -> str:
    def count(spec) -> str:
        a = spec.autoscaling
        if a is None:
            return str(spec.groups)
        return f"{spec.groups} (autoscaled {a.min_groups}-{a.max_groups} on {a.policy})"

    specs = {p.role: p for p in cfg.pool_specs()}
    if cfg.pools is None:
        return f"{count(specs['colocated'])} replica group(s)"
    return f"{count(specs['prefill'])} prefill + {count(specs['decode'])} decode group(s)"


def _metrics_url(cfg) -> str:
    port = cfg.serve.metrics_export_port
    return f"http://127.0.0.1:{port}/metrics" if port else "the Ray node's metrics export port"


def cmd_serve(args: argparse.Namespace) -> int:
    """Preflight, start (or join) Ray, deploy, wait for Ctrl-C / SIGTERM, drain, clean up.
    Exit 0 after a clean stop, 2 when the config cannot be served (nothing is left running)."""
    from deploy import preflight

    t0 = time.monotonic()
    try:
        cfg = preflight.load(args.config, _overrides(args))
        joining = cfg.serve.ray_address is not None
        if not joining:
            preflight.check_local(cfg)
    except preflight.ConfigError as e:
        return _config_failed(e)

    import ray
    from ray import serve

    from deploy import app

    stop = StopSignals()
    init: dict[str, Any] = {"address": cfg.serve.ray_address, "runtime_env": app.runtime_env(cfg)}
    if not joining:
        init["address"] = "local"
        init["num_cpus"] = preflight.local_cpus()
        if cfg.serve.metrics_export_port:
            init["_metrics_export_port"] = cfg.serve.metrics_export_port
    print(
        f"starting Ray ({'joining ' + str(cfg.serve.ray_address) if joining else 'local'}) ...",
        flush=True,
    )
    with stop.children_ignore_ctrl_c():
        ray.init(**init)
    stop.install()
    deployed = False
    try:
        if joining:
            try:
                preflight.check_cluster(cfg, ray.cluster_resources())
            except preflight.ConfigError as e:
                return _config_failed(e)
        print(
            f"starting {_layout(cfg)} of {cfg.model_name!r} (kernel build, weights "
            "and KV cache: the groups report below) ...",
            flush=True,
        )
        deployed = True
        app.start(cfg)
        print(usage_text(cfg), flush=True)
        print(f"ready in {time.monotonic() - t0:.1f} s", flush=True)
        stop.wait()
        print("stopping (Ctrl-C again to stop at once) ...", flush=True)
        left = app.drain(cfg, cfg.serve.drain_timeout_s, lambda line: print(line, flush=True))
        if left:
            print(
                f"{left} request(s) still running after {cfg.serve.drain_timeout_s:g} s: "
                "cancelling them",
                flush=True,
            )
    except KeyboardInterrupt:
        print("interrupted: stopping", flush=True)
    finally:
        stop.ignore()  # the clean-up below must not be interrupted half way
        if deployed:
            try:
                serve.delete(cfg.serve.app_name)  # only ours, whoever else uses the cluster
            except Exception as e:  # the app never came up, or Serve is gone already
                print(f"(deleting the app: {e})", file=sys.stderr)
            if not joining:
                serve.shutdown()
        ray.shutdown()  # ends the cluster only if we started it
        print("stopped", flush=True)
    return 0


class StopSignals:
    """Ctrl-C and SIGTERM for `flotilla serve`.

    Ray's own processes (GCS, raylet, dashboard, autoscaler, proxies, replicas) are started by
    ray.init with SIGINT ignored, which they inherit (CPython keeps an ignored SIGINT ignored),
    so a Ctrl-C in the terminal reaches only this process, which then drains and stops them in
    order, instead of every one of them dying with its own traceback. Before the app is ready
    a signal interrupts the start-up (KeyboardInterrupt); after, the first one starts the drain
    and a second one cuts the drain short.
    """

    def __init__(self) -> None:
        import threading

        self.requested = threading.Event()
        self.waiting = False

    def children_ignore_ctrl_c(self):
        import contextlib
        import signal

        @contextlib.contextmanager
        def ctx():
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                yield
            finally:
                signal.signal(signal.SIGINT, old)

        return ctx()

    def install(self) -> None:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def ignore(self) -> None:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        first = not self.requested.is_set()
        self.requested.set()
        if not self.waiting or not first:
            raise KeyboardInterrupt  # start-up, or a second signal during the drain

    def wait(self) -> None:
        self.waiting = True
        while not self.requested.wait(3600):
            pass


def cmd_generate(args: argparse.Namespace) -> int:
    if args.http:
        from deploy.generate_http import generate

        return generate(args)
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


def _set_overrides(items: list[str]) -> dict[str, Any]:
    """--set serve.host=0.0.0.0 -> {"serve.host": "0.0.0.0"} (values read as YAML scalars)."""
    import yaml

    from deploy import preflight

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(
                f"flotilla: --set {item!r}: expected KEY=VALUE, e.g. serve.host=0.0.0.0"
            )
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise preflight.ConfigError([f"--set {key}: not a YAML value: {value!r}"]) from None
    return out


def cmd_build(args: argparse.Namespace) -> int:
    from deploy import preflight, serve_config

    try:
        cfg = preflight.load(args.config, _set_overrides(args.set))
    except preflight.ConfigError as e:
        return _config_failed(e)
    text = serve_config.to_yaml(serve_config.build(cfg))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output}: `serve deploy {args.output}` or a RayService serveConfigV2")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from deploy import remote

    return remote.run_deploy(
        args.config, args.address, args.dashboard_address, args.dry_run, args.timeout
    )


def cmd_status(args: argparse.Namespace) -> int:
    from deploy import remote

    return remote.run_status(args.address, args.dashboard_address, args.app)


def cmd_delete(args: argparse.Namespace) -> int:
    from deploy import remote

    return remote.run_delete(args.address, args.dashboard_address, args.app, args.timeout)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="the Ray cluster's GCS (HOST:6379)")
    p.add_argument(
        "--dashboard-address", help="Ray dashboard URL (default: the one the cluster reports)"
    )


def build_parser() -> argparse.ArgumentParser:
    from router.version import version

    p = argparse.ArgumentParser(prog="flotilla", description="Flotilla LLM serving on Ray.")
    p.add_argument("--version", action="version", version=f"flotilla {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the Serve app (gRPC + OpenAI HTTP) until Ctrl-C")
    s.add_argument("--config", help="YAML file (deploy/examples/default.yaml shows every section)")
    for dest, (field, kind) in _FLAGS.items():
        s.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=kind,
                       help=f"override {field}")  # fmt: skip
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="write the Ray Serve config of a Flotilla config")
    b.add_argument("config", help="Flotilla YAML config")
    b.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    b.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set serve.host=0.0.0.0 (repeatable)",
    )
    b.set_defaults(func=cmd_build)

    d = sub.add_parser("deploy", help="apply the app onto an existing Ray cluster and wait")
    d.add_argument("config", help="Flotilla YAML config")
    _cluster_args(d)
    d.add_argument("--dry-run", action="store_true", help="check and print the plan only")
    d.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for RUNNING")
    d.set_defaults(func=cmd_deploy)

    st = sub.add_parser("status", help="applications, replicas, nodes and groups of a cluster")
    _cluster_args(st)
    st.add_argument("--app", help="only this application")
    st.set_defaults(func=cmd_status)

    de = sub.add_parser("delete", help="delete one application (the others stay)")
    _cluster_args(de)
    de.add_argument("--app", default="flotilla", help="application name (serve.app_name)")
    de.add_argument("--timeout", type=float, default=120.0, help="seconds to wait until gone")
    de.set_defaults(func=cmd_delete)

    g = sub.add_parser("generate", help="one request to a running server (gRPC or --http)")
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--address", default="127.0.0.1:9000", help="host:port of the gRPC proxy")
    g.add_argument(
        "--http",
        metavar="URL",
        help="send it through the OpenAI HTTP API at URL (e.g. http://127.0.0.1:8000) instead",
    )
    g.add_argument("--model", help="--http: the model name (default: the first one served)")
    g.add_argument("--api-key", help="--http: sent as 'Authorization: Bearer KEY'")
    g.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    g.set_defaults(func=cmd_generate)

    from deploy.bench.cli import register as register_bench  # `flotilla bench` (deploy/bench/)

    register_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
