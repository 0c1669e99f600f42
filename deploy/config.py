"""The one root config of a Flotilla deployment, loaded from YAML and validated once.

    engine:   cluster.config.EngineConfig  -- model, KV cache, scheduler, parallel layout
    groups:   how many replica groups (each one Serve replica running one engine)
    router:   router.config.RouterConfig   -- routing policy, session header, API limits
    serve:    ServeConfig (below)          -- ports, replicas, CPUs, Serve queue limits

Each layer receives only its own sub-config. This module (with workers.loader's cache
location) is the only place that reads the environment: nothing here does yet.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.config import EngineConfig
from router.config import RouterConfig


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    app_name: str = Field("flotilla", min_length=1, description="Serve application name.")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Listen address of the HTTP and the gRPC proxy (0.0.0.0 / :: for every "
        "interface). Applies when `flotilla serve` starts the cluster or Serve.",
    )
    http_port: int = Field(8000, ge=1, le=65535, description="OpenAI-compatible HTTP port.")
    grpc_port: int = Field(9000, ge=1, le=65535, description="gRPC port (flotilla.v1.Flotilla).")
    request_timeout_s: float | None = Field(
        None, gt=0, description="End-to-end limit per request in the proxies; None = no limit."
    )
    ingress_replicas: int = Field(1, ge=1, le=256, description="Router replicas.")
    ingress_num_cpus: float = Field(0.1, ge=0, description="Ray CPUs reserved per router replica.")
    ingress_max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests one router replica handles at once."
    )
    ingress_max_queued_requests: int = Field(
        1024,
        ge=-1,
        description="Requests queued in front of the routers beyond that (-1 = unbounded); past "
        "it the proxy answers RESOURCE_EXHAUSTED (gRPC) / 503 (HTTP).",
    )
    group_num_cpus: float = Field(
        1.0, ge=0, description="Ray CPUs reserved per replica group (its engine thread)."
    )
    health_check_period_s: float = Field(5.0, gt=0, description="Serve health-check period.")
    group_graceful_shutdown_s: float = Field(
        5.0,
        ge=0,
        description="How long a group being stopped waits for its routers' streams to close "
        "before Serve kills it (requests still running then fail with UNAVAILABLE).",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On Ctrl-C / SIGTERM, how long `flotilla serve` lets in-flight requests "
        "finish (new ones are refused with UNAVAILABLE / 503) before it deletes the app.",
    )
    metrics_export_port: int | None = Field(
        8080,
        ge=1,
        le=65535,
        description="Port of Ray's Prometheus endpoint when `flotilla serve` starts the "
        "cluster (None = Ray's default: a random port).",
    )
    throughput_optimized: bool = Field(
        True,
        description="Start the cluster in Ray Serve's throughput-optimized mode "
        "(RAY_SERVE_THROUGHPUT_OPTIMIZED: replica code on the replica's own event loop, "
        "proxy -> router -> group calls over gRPC instead of actor tasks), with the proxies kept "
        "(direct ingress off). Only applies when `flotilla serve` starts the cluster.",
    )
    ray_address: str | None = Field(
        None,
        description="Join this Ray cluster (e.g. 127.0.0.1:6379); None starts a local one.",
    )


class FlotillaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig = Field(default_factory=EngineConfig)
    groups: int = Field(1, ge=1, le=64, description="Replica groups, each a full model copy.")
    router: RouterConfig = Field(default_factory=RouterConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _check(self) -> FlotillaConfig:
        if self.serve.http_port == self.serve.grpc_port:
            raise ValueError(f"serve.http_port and serve.grpc_port are both {self.serve.grpc_port}")
        return self

    @property
    def model_name(self) -> str:
        return self.engine.model.name

    @classmethod
    def from_yaml(cls, path: str | Path) -> FlotillaConfig:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.model_validate(data)
