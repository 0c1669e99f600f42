"""Checks that run before `flotilla serve` starts anything, so a config that cannot work fails
at once with one message naming the field and the numbers, instead of Serve waiting forever.

    load(path, overrides)      the YAML and the CLI overrides -> FlotillaConfig (ConfigError)
    check_local(config)        model files, listen ports, CPUs of the cluster we would start
    check_cluster(config, r)   CPUs and custom resources of an existing cluster against what
                               the config reserves

Each check raises ConfigError with every problem it found; the CLI prints it and exits 2.
Nothing here starts Ray or imports torch.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from deploy.config import FlotillaConfig


class ConfigError(ValueError):
    """What the user must change; one problem a line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _field_errors(e: ValidationError, prefix: str = "") -> list[str]:
    out = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        msg = err["msg"].removeprefix("Value error, ")
        where = f"{prefix}{loc}: " if loc else prefix
        shown = "" if err["type"] in ("missing", "value_error") else f" (got {err['input']!r})"
        out.append(f"{where}{msg}{shown}")
    return out


def load(path: str | None, overrides: dict[str, Any] | None = None) -> FlotillaConfig:
    """The validated config: YAML file (or the defaults), then `overrides` (dotted keys such
    as "engine.model.model"). Raises ConfigError naming the file, line or field."""
    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        where = f"{path}: "
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError([f"config file {path}: {e.strerror or e}"]) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError([f"{where}{at}not valid YAML: {problem}"]) from None
        if not isinstance(data, dict):
            raise ConfigError(
                [f"{where}expected a mapping at the top level, not {type(data).__name__}"]
            )
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([f"{where}{p}: expected a mapping"])
        node[leaf] = value
    try:
        return FlotillaConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_field_errors(e, where)) from None


def cpu_demand(config: FlotillaConfig, largest: bool = False) -> tuple[float, str]:
    """Ray CPUs the application reserves, and how that number is made up (for messages): at
    the group counts it starts with, or (`largest`) at autoscaling's max_groups."""
    s = config.serve
    total = s.ingress_replicas * s.ingress_num_cpus
    parts: dict[str, list] = {}  # one term per pool: [groups, cpus per group, ranks, per rank]
    for spec in config.pool_specs():
        n = spec.max_groups if largest else spec.groups
        p = spec.engine.parallel
        ranks = 0 if p.is_single else p.world_size
        total += n * (spec.num_cpus + ranks * p.cpus_per_rank)
        parts[spec.role] = [n, spec.num_cpus, ranks, p.cpus_per_rank]
    terms = []
    for role, (n, cpus, ranks, per_rank) in parts.items():
        what = "group(s)" if role == "colocated" else f"{role} group(s)"
        field = "serve.group_num_cpus" if role == "colocated" else f"pools.{role} CPUs"
        if ranks:
            terms.append(
                f"{n} {what} x ({field} {cpus:g} + {ranks} ranks x "
                f"engine.parallel.cpus_per_rank {per_rank:g})"
            )
        else:
            terms.append(f"{n} {what} x {field} {cpus:g}")
    terms.append(f"{s.ingress_replicas} router(s) x serve.ingress_num_cpus {s.ingress_num_cpus:g}")
    return total, " + ".join(terms)


def check_cpus(
    config: FlotillaConfig, cluster_cpus: float, where: str, largest: bool = False
) -> list[str]:
    need, how = cpu_demand(config, largest)
    if need <= cluster_cpus + 1e-9:
        return []
    scaled = any(p.autoscaling for p in config.pool_specs())
    at = " at autoscaling's max_groups" if largest and scaled else ""
    return [
        f"the config reserves {need:g} CPUs{at} ({how}) but {where} has {cluster_cpus:g}: lower "
        f"{'max_groups, ' if scaled else ''}groups, serve.group_num_cpus or "
        "serve.ingress_num_cpus (fractions are fine: CPUs here are Ray's logical reservations)"
    ]


# What every node reports by itself, besides the custom resources it was started with.
_RAY_OWN = ("CPU", "GPU", "memory", "object_store_memory")
_RAY_OWN_PREFIXES = ("node:", "accelerator_type:")


def resource_demand(config: FlotillaConfig) -> list[tuple[str, str, float]]:
    """(field, resource, amount per actor) for every custom resource the config asks for."""
    out = []
    for spec in config.pool_specs():
        out += [(spec.resources_field, k, v) for k, v in (spec.resources or {}).items()]
        own = config.pools is not None and getattr(config.pools, spec.role).parallel is not None
        field = f"pools.{spec.role}.parallel" if own else "engine.parallel"
        p = spec.engine.parallel
        if not p.is_single:
            out += [(f"{field}.rank_resources", k, v) for k, v in p.rank_resources.items()]
    return list(dict.fromkeys(out))  # pools sharing serve.* / engine.* ask once


def check_resources(config: FlotillaConfig, cluster: dict[str, float], where: str) -> list[str]:
    """Custom resources the cluster lacks would leave the groups pending forever."""
    custom = (k for k in cluster if k not in _RAY_OWN and not k.startswith(_RAY_OWN_PREFIXES))
    have = ", ".join(sorted(custom)) or "none"
    problems = []
    for field, name, amount in resource_demand(config):
        if name not in cluster:
            problems.append(
                f"{field}: {where} has no custom resource {name!r} (it has: {have}; nodes get "
                "them from `ray start --resources`)"
            )
        elif amount > float(cluster[name]) + 1e-9:
            problems.append(
                f"{field}: asks for {amount:g} {name} but {where} has {cluster[name]:g}"
            )
    return problems


def local_cpus() -> int:
    """The CPUs a Ray cluster started here gets (ray.init counts the cores this process may use)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_model(config: FlotillaConfig) -> list[str]:
    from workers.model_path import resolve_model_path  # torch-free

    try:
        resolve_model_path(config.engine.model.model)
    except FileNotFoundError as e:
        return [f"engine.model.model: {e}"]
    return []


def port_problem(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on, or None. SO_REUSEADDR as servers set it, so a
    port held only by closing connections (TIME_WAIT) is not reported."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {host!r}: {e.strerror}"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"{host}:{port} is already in use"
            if e.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return f"cannot listen on {host}:{port}: {e.strerror}"
    return None


def check_ports(config: FlotillaConfig) -> list[str]:
    s = config.serve
    ports = [("serve.http_port", s.host, s.http_port), ("serve.grpc_port", s.host, s.grpc_port)]
    if s.metrics_export_port:
        ports.append(("serve.metrics_export_port", "127.0.0.1", s.metrics_export_port))
    out = []
    for field, host, port in ports:
        problem = port_problem(host, port)
        if problem:
            out.append(f"{field}: {problem}")
    return out


def check_local(config: FlotillaConfig) -> None:
    """Everything checkable before starting a cluster on this machine."""
    problems = check_model(config) + check_ports(config)
    # No cluster autoscaler adds a machine here: every group a pool may grow to must fit.
    where = f"this machine ({local_cpus()} cores)"
    problems += check_cpus(config, local_cpus(), where, largest=True)
    # The cluster `flotilla serve` starts has no custom resources (join one that does).
    problems += check_resources(config, {}, "the local Ray cluster")
    if problems:
        raise ConfigError(problems)


def check_cluster(config: FlotillaConfig, cluster_resources: dict[str, float]) -> None:
    """An existing cluster: its CPUs and custom resources (ports and files live on its nodes,
    not here)."""
    cpus = float(cluster_resources.get("CPU", 0.0))
    problems = check_cpus(config, cpus, "the Ray cluster")
    problems += check_resources(config, cluster_resources, "the Ray cluster")
    if problems:
        raise ConfigError(problems)
