"""One Serve app (two replica groups of the tiny seeded Llama) on tests/deploy's shared
cluster, shared by every test module in this package and deleted after the last of them."""

from __future__ import annotations

import grpc
import openai
import pytest
from app_fixtures import running_app

from deploy.config import FlotillaConfig
from router.proto import flotilla_pb2_grpc as pb_grpc

from .serve_support import BASE, BLOCK, GRPC_PORT, HTTP_PORT, MAX_MODEL_LEN


@pytest.fixture(scope="package")
def config(tiny_model_dir) -> FlotillaConfig:
    return FlotillaConfig.model_validate(
        {
            "engine": {
                "model": {
                    "model": tiny_model_dir("llama"),
                    "dtype": "float32",
                    "max_model_len": MAX_MODEL_LEN,
                    "num_threads": 1,
                },
                "cache": {"block_size": BLOCK, "num_blocks": 1024},
                "scheduler": {"max_num_seqs": 4, "max_waiting": 4},
            },
            "groups": 2,
            "router": {"policy": "prefix_aware", "stats_interval_s": 0.1, "max_n": 4},
            "serve": {
                "http_port": HTTP_PORT,
                "grpc_port": GRPC_PORT,
                "group_num_cpus": 0.5,
                "health_check_period_s": 2.0,
                "group_graceful_shutdown_s": 1.0,
            },
        }
    )


@pytest.fixture(scope="package")
def app(config):
    """The router's DeploymentHandle (for group stats); the app listens on HTTP_PORT/GRPC_PORT."""
    with running_app(config) as router:
        yield router


@pytest.fixture(scope="package")
def stub(app):
    channel = grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}")
    yield pb_grpc.FlotillaStub(channel)
    channel.close()


@pytest.fixture(scope="package")
def client(app):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="package")
def offline(config):
    """The engine itself, in this process: the reference for greedy outputs."""
    from cluster.engine import LLMEngine

    return LLMEngine(config.engine)
