"""`flotilla deploy / status / delete` against an existing Ray cluster.

Deploys go through the dashboard's Serve REST API (`PUT /api/serve/applications/`), the path
`serve deploy` and KubeRay take, so the cluster holds a declarative config: re-applying the
same one changes nothing, a changed replica count is applied in place. That PUT replaces the
whole set of declaratively deployed applications, so every apply here first reads what the
cluster runs and keeps the other applications as they are (apps started with `serve.run` /
`flotilla serve` are not touched by it at all).

The CLI also connects as a Ray driver (`ray.init(address=...)`) for what REST does not give:
the cluster's resources (preflight), its nodes, and the router's group stats.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from deploy import serve_config

Report = Callable[[str], None]


class DeployError(RuntimeError):
    """The deploy failed or did not finish: the message says why (exit 1)."""


def connect(address: str, dashboard: str | None = None) -> str:
    """ray.init onto the cluster; returns the dashboard's http URL: `dashboard` if given,
    else the one the cluster reports."""
    import logging

    import ray

    ctx = ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    url = dashboard or ctx.dashboard_url
    if not url:
        raise DeployError(
            f"the Ray cluster at {address} runs no dashboard: pass --dashboard-address"
        )
    return url if "://" in url else f"http://{url}"


def say(line: str) -> None:
    print(line, flush=True)


def err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def client(dashboard_url: str):
    """Ray's REST client. On a cluster with token auth it sends the token (RAY_AUTH_TOKEN, else
    the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) only when this process has
    RAY_AUTH_MODE=token, as ray.init(address=...) does: a token is never sent to an address
    the user did not mark as a token cluster."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard_url)


# ---- apply --------------------------------------------------------------------------------


def _others(details: dict[str, Any], app_name: str) -> list[dict[str, Any]]:
    """The configs of the cluster's other declaratively deployed applications, as deployed
    (imperative apps are not part of the declarative set: a PUT leaves them alone)."""
    return [
        app["deployed_app_config"]
        for name, app in (details.get("applications") or {}).items()
        if name != app_name
        and app.get("source") == "declarative"
        and app.get("deployed_app_config")
    ]


def merged(details: dict[str, Any], ours: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`ours` (one application) plus every other declarative application of the cluster;
    returns the config to PUT and the names kept."""
    kept = _others(details, ours["applications"][0]["name"])
    return ours | {"applications": kept + ours["applications"]}, [a["name"] for a in kept]


def without(details: dict[str, Any], app_name: str) -> dict[str, Any]:
    """The cluster's declarative config minus `app_name`, proxy options as they run (for delete)."""
    config = {
        k: details[k] for k in ("proxy_location", "http_options", "grpc_options") if details.get(k)
    }
    return config | {"applications": _others(details, app_name)}


def proxy_warnings(details: dict[str, Any], serve_cfg: dict[str, Any]) -> list[str]:
    """Proxy options are fixed when Serve starts on a cluster; say which of ours are ignored."""
    if not details.get("controller_info"):
        return []  # Serve not running yet: this deploy starts it with our options
    out = []
    for section, fields in (("http_options", ("host", "port")), ("grpc_options", ("port",))):
        running, wanted = details.get(section) or {}, serve_cfg[section]
        for f in fields:
            if f in running and running[f] != wanted[f]:
                out.append(
                    f"Serve already runs on this cluster with {section}.{f} = {running[f]!r}; "
                    f"the config's {wanted[f]!r} is ignored (proxy options are fixed when Serve "
                    "starts)"
                )
    return out


def apply(rest, serve_cfg: dict[str, Any], report: Report) -> float | None:
    """PUT our app merged into the cluster's declarative config; returns the app's
    last_deployed_time_s before the PUT (None if it was not deployed), to tell a finished
    rollout of this apply from the state before it."""
    details = rest.get_serve_details()
    app_name = serve_cfg["applications"][0]["name"]
    current = (details.get("applications") or {}).get(app_name)
    if current is not None and current.get("source") == "imperative":
        raise DeployError(
            f"application {app_name!r} on this cluster was started with serve.run / flotilla "
            "serve, not declaratively: stop it (or `flotilla delete`) first, or choose another "
            "serve.app_name"
        )
    config, kept = merged(details, serve_cfg)
    for line in proxy_warnings(details, serve_cfg):
        report(f"warning: {line}")
    if kept:
        report(f"keeping the other application(s) on the cluster as they are: {', '.join(kept)}")
    report(f"applying application {app_name!r} ({'update' if current else 'new'}) ...")
    rest.deploy_applications(config)
    return current.get("last_deployed_time_s") if current else None


# ---- wait ---------------------------------------------------------------------------------


def replica_counts(deployment: dict[str, Any]) -> tuple[int, int, dict[str, int]]:
    """(running, target, count per state) of one deployment in Serve's details."""
    states: dict[str, int] = {}
    for r in deployment.get("replicas") or []:
        states[r["state"]] = states.get(r["state"], 0) + 1
    return states.get("RUNNING", 0), int(deployment.get("target_num_replicas") or 0), states


def deployment_line(name: str, deployment: dict[str, Any]) -> str:
    running, target, states = replica_counts(deployment)
    others = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()) if s != "RUNNING")
    return (
        f"deployment {name}: {running}/{target} replicas running"
        + (f" ({others})" if others else "")
        + f" [{deployment.get('status')}]"
    )


def group_line(g: dict[str, Any]) -> str:
    kv = g.get("kv_usage")
    kv_text = f"{100 * kv:.0f}%" if isinstance(kv, int | float) else "?"
    return (
        f"group {g.get('name')} ({g.get('role')}): "
        f"{'healthy' if g.get('healthy') else 'NOT healthy'}, {g.get('num_running', '?')} "
        f"running, {g.get('num_waiting', '?')} waiting, KV {kv_text}"
    )


def group_stats(app_name: str, timeout_s: float = 10.0) -> list[dict[str, Any]] | None:
    """The router's view of every group (Ingress.group_stats), or None if it cannot answer."""
    from ray import serve

    try:
        handle = serve.get_app_handle(app_name)
        return handle.group_stats.remote(refresh=True).result(timeout_s=timeout_s)
    except Exception:  # the router is not up (yet), or the app is gone
        return None


def ready(
    app: dict[str, Any] | None, expected: dict[str, int | None], before: float | None
) -> bool:
    """RUNNING, this apply taken, and every deployment at its replica count (`expected`: name
    -> num_replicas, None for an autoscaled one) with nothing starting or stopping."""
    if app is None or app.get("status") != "RUNNING":
        return False
    if before is not None and app.get("last_deployed_time_s") == before:
        return False  # the controller has not taken this apply yet
    deployments = app.get("deployments") or {}
    for name, want in expected.items():
        d = deployments.get(name)
        if d is None or d.get("status") != "HEALTHY":
            return False
        running, target, states = replica_counts(d)
        if running != target or sum(states.values()) != running or want not in (None, target):
            return False
    return True


def wait_ready(
    rest,
    serve_cfg: dict[str, Any],
    before: float | None,
    timeout_s: float,
    report: Report,
    poll_s: float = 1.0,
) -> None:
    """Until the app is RUNNING with every expected deployment's replicas running (progress
    lines as they change); DeployError on DEPLOY_FAILED or after timeout_s."""
    entry = serve_cfg["applications"][0]
    app_name = entry["name"]
    expected = {d["name"]: d.get("num_replicas") for d in entry["deployments"]}
    deadline = time.monotonic() + timeout_s
    shown: dict[str, str] = {}
    while True:
        app = (rest.get_serve_details().get("applications") or {}).get(app_name)
        fresh = app is not None and (before is None or app.get("last_deployed_time_s") != before)
        if fresh and app.get("status") == "DEPLOY_FAILED":
            raise DeployError(
                f"Serve reports DEPLOY_FAILED for {app_name!r}:\n{app.get('message')}"
            )
        lines = {}
        if fresh:
            for name, d in sorted((app.get("deployments") or {}).items()):
                lines[name] = deployment_line(name, d)
            router = (app.get("deployments") or {}).get(serve_config.ROUTER_DEPLOYMENT)
            if router and replica_counts(router)[0] > 0:
                for g in group_stats(app_name, timeout_s=5.0) or []:
                    lines[f"group:{g.get('name')}"] = group_line(g)
        for key, line in lines.items():
            if shown.get(key) != line:
                report(line)
                shown[key] = line
        if ready(app, expected, before):
            return
        if time.monotonic() > deadline:
            status = app.get("status") if app else "not deployed"
            raise DeployError(
                f"{app_name!r} not ready after {timeout_s:g} s (status {status}); it is left "
                "deploying: see `flotilla status`"
            )
        time.sleep(poll_s)


# ---- status / delete ----------------------------------------------------------------------


def nodes_text() -> list[str]:
    import ray

    out = []
    for n in sorted(ray.nodes(), key=lambda n: n.get("NodeManagerAddress", "")):
        res = n.get("Resources") or {}
        custom = {
            k: v
            for k, v in res.items()
            if k not in ("CPU", "GPU", "memory", "object_store_memory")
            and not k.startswith("node:")
            and not k.startswith("accelerator_type:")
        }
        head = " (head)" if "node:__internal_head__" in res else ""
        out.append(
            f"  node {n['NodeID'][:12]} {n.get('NodeManagerAddress')}{head}: "
            f"{'alive' if n.get('Alive') else 'DEAD'}, CPU {res.get('CPU', 0):g}"
            + (f", GPU {res['GPU']:g}" if res.get("GPU") else "")
            + (f", {', '.join(f'{k} {v:g}' for k, v in sorted(custom.items()))}" if custom else "")
        )
    return out


def status_text(details: dict[str, Any], app_name: str | None) -> str:
    """Every application (or just `app_name`), each deployment's replica states, the nodes,
    and the groups of each app that answers group_stats."""
    apps = details.get("applications") or {}
    names = [app_name] if app_name else sorted(apps)
    lines = []
    if not apps and not app_name:
        lines.append("no Serve application on this cluster")
    for name in names:
        app = apps.get(name)
        if app is None:
            lines.append(f"application {name}: not deployed")
            continue
        lines.append(f"application {name}: {app.get('status')} ({app.get('source')})")
        if app.get("message"):
            lines += [f"  {ln}" for ln in str(app["message"]).splitlines()]
        for dname, d in sorted((app.get("deployments") or {}).items()):
            lines.append(f"  {deployment_line(dname, d)}")
        if app.get("status") in ("RUNNING", "DEPLOYING", "UNHEALTHY"):
            for g in group_stats(name) or []:
                lines.append(f"  {group_line(g)}")
    lines.append("nodes:")
    lines += nodes_text()
    return "\n".join(lines)


def delete(rest, app_name: str, timeout_s: float, report: Report) -> None:
    """Delete only `app_name`; the other applications and Serve itself stay."""
    details = rest.get_serve_details()
    app = (details.get("applications") or {}).get(app_name)
    if app is None:
        report(f"application {app_name!r} is not deployed")
        return
    if app.get("source") == "imperative":
        from ray import serve

        serve.delete(app_name, _blocking=False)  # not part of the declarative set
    else:
        rest.deploy_applications(without(details, app_name))
    report(f"deleting application {app_name!r} ...")
    deadline = time.monotonic() + timeout_s
    while app_name in (rest.get_serve_details().get("applications") or {}):
        if time.monotonic() > deadline:
            raise DeployError(f"{app_name!r} still present after {timeout_s:g} s")
        time.sleep(1.0)
    report(f"application {app_name!r} deleted")


# ---- the commands -------------------------------------------------------------------------


def plan_text(cfg, serve_cfg: dict[str, Any], cluster_cpus: float) -> str:
    from deploy import preflight

    s = cfg.serve
    lines = [f"plan: application {s.app_name!r} serving {cfg.model_name!r}"]
    for spec in cfg.pool_specs():
        p = spec.engine.parallel
        ranks = "" if p.is_single else f" + {p.world_size} ranks x {p.cpus_per_rank:g} CPU"
        if not p.is_single and p.placement != "pack":
            ranks += f" ({p.placement})"
        pinned = ", ".join(f"{v:g} {k}" for k, v in (spec.resources or {}).items())
        a = spec.autoscaling
        count = (
            f"{spec.groups} group(s)"
            if a is None
            else f"{spec.groups} group(s), autoscaling {a.min_groups}-{a.max_groups} on {a.policy}"
        )
        lines.append(
            f"  pool {spec.role} (deployment {spec.deployment}): {count}, "
            f"{spec.num_cpus:g} CPU each{ranks}" + (f", on nodes with {pinned}" if pinned else "")
        )
    lines.append(f"  router: {s.ingress_replicas} replica(s), {s.ingress_num_cpus:g} CPU each")
    need, _ = preflight.cpu_demand(cfg)
    lines.append(f"  CPUs reserved: {need:g} of the cluster's {cluster_cpus:g}")
    lines.append(
        f"  HTTP (OpenAI) {s.host}:{s.http_port}, gRPC port {s.grpc_port}, "
        f"proxies: {s.proxy_location}"
    )
    lines.append("  Serve config (merged by name with the cluster's other applications):")
    lines += [f"    {ln}" for ln in serve_config.to_yaml(serve_cfg).splitlines()]
    return "\n".join(lines)


def run_deploy(
    config_path: str,
    address: str,
    dashboard: str | None,
    dry_run: bool,
    timeout_s: float,
    report: Report = say,
) -> int:
    """Preflight (exit 2, nothing deployed), plan, apply, wait (exit 1 on failure / timeout)."""
    import ray

    from deploy import preflight

    try:
        cfg = preflight.load(config_path)
    except preflight.ConfigError as e:
        return config_failed(e)
    serve_cfg = serve_config.build(cfg)
    try:
        url = connect(address, dashboard)
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        try:
            preflight.check_cluster(cfg, ray.cluster_resources())
        except preflight.ConfigError as e:
            return config_failed(e)
        if dry_run:
            report(plan_text(cfg, serve_cfg, cpus))
            report("dry run: nothing deployed")
            return 0
        rest = client(url)
        t0 = time.monotonic()
        before = apply(rest, serve_cfg, report)
        wait_ready(rest, serve_cfg, before, timeout_s, report)
        report(f"{cfg.serve.app_name!r} is RUNNING ({time.monotonic() - t0:.1f} s)")
        return 0
    except Exception as e:  # a CLI answers with the reason, not a traceback
        return failed(e)
    finally:
        ray.shutdown()  # only disconnects: the cluster and the app stay


def failed(e: Exception) -> int:
    err(f"flotilla: {e if isinstance(e, DeployError) else f'{type(e).__name__}: {e}'}")
    if isinstance(e, ConnectionError) and os.environ.get("RAY_AUTH_MODE") != "token":
        err(
            "  (a cluster started with RAY_AUTH_MODE=token needs RAY_AUTH_MODE=token here too, "
            "and its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        )
    return 1


def config_failed(e: Exception) -> int:
    err("flotilla: the config cannot be served:")
    for line in str(e).splitlines():
        err(f"  - {line}")
    return 2


def run_status(address: str, dashboard: str | None, app_name: str | None) -> int:
    import ray

    try:
        url = connect(address, dashboard)
        say(status_text(client(url).get_serve_details(), app_name))
        return 0
    except Exception as e:  # a CLI answers with the reason, not a traceback
        return failed(e)
    finally:
        ray.shutdown()


def run_delete(
    address: str, dashboard: str | None, app_name: str, timeout_s: float, report: Report = say
) -> int:
    import ray

    try:
        url = connect(address, dashboard)
        delete(client(url), app_name, timeout_s, report)
        return 0
    except Exception as e:  # a CLI answers with the reason, not a traceback
        return failed(e)
    finally:
        ray.shutdown()
