"""Structured output and tools through the real Serve app (one group of the tiny random Qwen3
with a Hermes-style tools template), with the official `openai` client and a stub generated
from our .proto: every constrained answer parses and validates against its schema (checked by
`jsonschema`, which nobody here wrote), forced tool calls come back as OpenAI tool_calls, bad
schemas / regexes are 400 / INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest
from app_fixtures import META, grpc_stub, running_app, tiny_app_config

from deploy.config import FlotillaConfig
from router.proto import flotilla_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.serve_cluster]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Oslo", "Lima", "Pune"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER_ARGS},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
            },
        },
    },
]
ARGS_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Oslo this week?"}]
REGEX = r"[0-9]{3}-[a-z]{2,4}"


@pytest.fixture(scope="module")
def config(tools_model_dir) -> FlotillaConfig:
    return tiny_app_config(
        tools_model_dir,
        {
            "engine": {
                "model": {"max_model_len": 512},
                "cache": {"num_blocks": 512},
                "scheduler": {"max_waiting": 16},
            }
        },
    )


@pytest.fixture(scope="module")
def app(config):
    with running_app(config) as router:
        yield router


@pytest.fixture(scope="module")
def client(app, config):
    base = f"http://127.0.0.1:{config.serve.http_port}/v1"
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(app, config):
    with grpc_stub(config) as s:
        yield s


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def test_chat_json_schema_parses_and_validates(client):
    for temperature, seed in ((0.0, None), (1.0, 7)):
        resp = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=USER,
            max_tokens=80,
            temperature=temperature,
            seed=seed,
            response_format=_schema_format(SCHEMA),
        )
        choice = resp.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_mixed_batch_constrained_and_free(client):
    """Concurrent requests share engine steps: constrained rows match, free rows are free."""
    model = client.models.list().data[0].id

    def constrained(i: int):
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"person {i}"}],
            max_tokens=80,
            temperature=0.8,
            seed=i,
            response_format=_schema_format(SCHEMA),
        )

    def free(i: int):
        return client.completions.create(
            model=model, prompt=f"free text {i}", max_tokens=24, temperature=0.0
        )

    with ThreadPoolExecutor(8) as pool:
        cons = [pool.submit(constrained, i) for i in range(4)]
        frees = [pool.submit(free, i) for i in range(4)]
        outs = [f.result() for f in cons]
        texts = [f.result().choices[0].text for f in frees]
    for out in outs:
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    assert any(not t.lstrip().startswith("{") for t in texts)  # the free ones are not JSON


def test_completions_stream_json_object_and_regex(client):
    model = client.models.list().data[0].id
    stream = client.completions.create(
        model=model,
        prompt="Here is a JSON object:",
        max_tokens=60,
        temperature=0.0,
        stream=True,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    out = client.completions.create(
        model=model,
        prompt="A code:",
        max_tokens=20,
        temperature=1.0,
        seed=3,
        extra_body={"structured_outputs": {"regex": REGEX}},
    )
    assert re.fullmatch(REGEX, out.choices[0].text), out.choices[0].text


def test_length_before_the_schema_closes(client):
    out = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=USER,
        max_tokens=3,
        temperature=0.0,
        response_format=_schema_format(SCHEMA),
    )
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_call(client, choice):
    resp = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=USER,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=80,
        temperature=0.0,
    )
    c = resp.choices[0]
    assert c.finish_reason == "tool_calls", c.message
    [call] = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), ARGS_OF[call.function.name])
    # the call goes back into the conversation through the template
    follow = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=USER
        + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 3}'},
        ],
        tools=TOOLS,
        max_tokens=5,
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_forced_tool_call_streamed(client):
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
        temperature=0.0,
        stream=True,
    )
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    [call] = calls
    assert call.index == 0 and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), ARGS_OF["get_time"])
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_tool_choice_none_and_auto_answer_plainly(client):
    model = client.models.list().data[0].id
    for choice in ("none", "auto"):
        resp = client.chat.completions.create(
            model=model, messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=8
        )
        c = resp.choices[0]
        # random weights do not write a <tool_call> block: the text comes back as content
        assert c.message.content and not c.message.tool_calls
        assert c.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(response_format=_schema_format({"type": "nope"})), "response_format.json_schema.schema"),
        (dict(extra_body={"structured_outputs": {"regex": "(unclosed"}}), "structured_outputs.regex"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
         "tools[0].function.parameters"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice.function.name"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=client.models.list().data[0].id, messages=USER, max_tokens=4, **kwargs
        )
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_grpc_json_schema_and_bad_regex(stub):
    params = pb.SamplingParams(max_tokens=80, temperature=0.0, json_schema=json.dumps(SCHEMA))
    resp = stub.Generate(
        pb.GenerateRequest(prompt="A person:", params=params), metadata=META, timeout=120
    )
    assert resp.finish_reason == "stop"
    jsonschema.validate(json.loads(resp.text), SCHEMA)
    parts = list(
        stub.GenerateStream(
            pb.GenerateRequest(
                prompt="A code:", params=pb.SamplingParams(max_tokens=20, regex=REGEX, seed=1)
            ),
            metadata=META,
            timeout=120,
        )
    )
    assert re.fullmatch(REGEX, "".join(p.text for p in parts))
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(
            pb.GenerateRequest(prompt="x", params=pb.SamplingParams(regex="[a-")),
            metadata=META,
            timeout=60,
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("params.regex:")
