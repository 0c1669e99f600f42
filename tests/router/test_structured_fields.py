"""Output constraints and tools at the router (no Ray, no model): which request fields become
which constraint, 400 / INVALID_ARGUMENT naming the field for a bad schema, regex or tool,
Hermes tool-call parsing and stream hold-back."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from test_api_ext import HI, _Context, _json, _request

from router import grpc_api, openai_api, structured, tools
from router.proto import flotilla_pb2 as pb
from router.tokenize import Tokenizer
from workers.errors import InvalidRequest

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _field(fn) -> str:
    with pytest.raises(InvalidRequest) as e:
        fn()
    return e.value.field


def test_each_source_gives_its_constraint():
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    spec = structured.from_request(rf, None)
    assert spec.kind == "json_schema" and json.loads(spec.spec) == SCHEMA
    assert structured.from_request({"type": "json_object"}, None).kind == "json_object"
    assert structured.from_request({"type": "text"}, None) is None
    assert structured.from_request(None, {"structured_outputs": {"regex": "a+"}}).spec == "a+"
    assert structured.from_request(None, {"guided_json": json.dumps(SCHEMA)}).kind == "json_schema"
    g = structured.from_request(None, {"guided_grammar": 'start: "yes" | "no"'})
    assert g.kind == "grammar"


@pytest.mark.parametrize(
    ("rf", "extra", "field"),
    [
        ({"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}, None,
         "response_format.json_schema.schema"),
        ({"type": "json_schema"}, None, "response_format.json_schema"),
        ({"type": "xml"}, None, "response_format.type"),
        (None, {"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex"),
        (None, {"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
        (None, {"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs"),
        (None, {"guided_regex": "[a-"}, "guided_regex"),
        (None, {"guided_json": "{not json"}, "guided_json"),
        (None, {"guided_grammar": "start: nowhere"}, "guided_grammar"),
        ({"type": "json_object"}, {"guided_regex": "a"}, "guided_regex"),
    ],
)  # fmt: skip
def test_bad_constraints_name_the_field(rf, extra, field):
    assert _field(lambda: structured.from_request(rf, extra)) == field


def test_tool_plans():
    assert tools.plan(None, "none", False) is tools.NO_TOOLS
    assert tools.plan([WEATHER], "none", False) is tools.NO_TOOLS  # no template needed
    auto = tools.plan([WEATHER], None, True)
    assert auto.tools == [WEATHER] and auto.forced is None and auto.parse
    forced = tools.plan([WEATHER], "required", True).forced
    schema = json.loads(forced.spec)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    named = tools.plan([WEATHER, {**WEATHER, "function": {"name": "other"}}],
                       {"type": "function", "function": {"name": "other"}}, True)  # fmt: skip
    assert json.loads(named.forced.spec)["properties"]["name"] == {"const": "other"}
    assert _field(lambda: tools.plan([WEATHER], None, False)) == "tools"
    assert _field(lambda: tools.plan([WEATHER], "maybe", True)) == "tool_choice"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
    assert _field(lambda: tools.plan([bad], None, True)) == "tools[0].function.parameters"
    assert _field(lambda: tools.plan([WEATHER, WEATHER], None, True)) == "tools[1].function.name"
    choice = {"type": "function", "function": {"name": "nope"}}
    assert _field(lambda: tools.plan([WEATHER], choice, True)) == "tool_choice.function.name"


def test_hermes_calls_are_parsed_out_of_text():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = tools.parse(text, forced=False)
    assert content == "Let me check."
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    two = text + '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    assert [c["function"]["name"] for c in tools.parse(two, False)[1]] == ["get_weather", "g"]
    assert tools.parse("<tool_call>not json</tool_call>", False) == (
        "<tool_call>not json</tool_call>", [])  # fmt: skip
    assert tools.parse("plain", False) == ("plain", [])
    _, forced = tools.parse('{"name": "get_weather", "arguments": {"city": "x"}}', True)
    assert json.loads(forced[0]["function"]["arguments"]) == {"city": "x"}
    assert tools.parse('{"name": "get_wea', True) == ('{"name": "get_wea', [])  # cut by length


def test_stream_holds_back_from_the_tag():
    assert tools.split_stream("Hello <tool", False) == ("Hello ", "<tool", False)
    assert tools.split_stream("<tools", False) == ("<tools", "", False)  # not the tag after all
    assert tools.split_stream("ok <tool_call>{", False) == ("ok ", "<tool_call>{", True)
    assert tools.split_stream("anything", True) == ("", "anything", True)


@pytest.fixture(scope="module")
def tools_tokenizer_files(tools_model_dir):
    from workers.loader import load_tokenizer

    tok = load_tokenizer(tools_model_dir)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def test_tools_go_into_the_template(tools_tokenizer_files):
    tok = Tokenizer(tools_tokenizer_files)
    assert tok.supports_tools
    with_tools = tok.tok.decode(tok.apply_chat_template(HI, True, [WEATHER]))
    assert '"name": "get_weather"' in with_tools and "<tool_call>" in with_tools
    assert "get_weather" not in tok.tok.decode(tok.apply_chat_template(HI, True))


@pytest.mark.parametrize(
    ("req", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex"),
        ({"tools": [WEATHER]}, "tools"),  # SmolLM2's template has no tools
        ({"tools": [WEATHER], "tool_choice": "none", "guided_regex": "["}, "guided_regex"),
    ],
)  # fmt: skip
def test_http_400_names_the_field(offline_router, req, param):
    resp = asyncio.run(
        openai_api.chat_completions(offline_router, _request({"messages": HI} | req))
    )
    status, out, _ = asyncio.run(_json(resp))
    assert status == 400 and out["error"]["param"] == param, out


def test_completions_take_response_format_too(offline_router):
    req = {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": "s"}}
    status, out, _ = asyncio.run(
        _json(asyncio.run(openai_api.completions(offline_router, _request(req))))
    )
    assert status == 400 and out["error"]["param"] == "response_format.json_schema"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (pb.SamplingParams(regex="(a"), "params.regex"),
        (pb.SamplingParams(json_schema='{"type": "nope"}'), "params.json_schema"),
        (pb.SamplingParams(json_schema="{oops"), "params.json_schema"),
        (pb.SamplingParams(grammar="start: x"), "params.grammar"),
    ],
)
def test_grpc_invalid_argument_names_the_field(offline_router, params, field):
    ctx = _Context()
    req = pb.GenerateRequest(prompt="hi", params=params)
    asyncio.run(grpc_api.generate(offline_router, req, ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details().startswith(f"{field}:"), ctx.details()


def test_grpc_fields_become_the_constraint(offline_router):
    _, sp = grpc_api.prepare(offline_router, pb.GenerateRequest(
        prompt="hi", params=pb.SamplingParams(json_schema=json.dumps(SCHEMA))))  # fmt: skip
    assert sp.structured.kind == "json_schema" and json.loads(sp.structured.spec) == SCHEMA
    _, sp = grpc_api.prepare(
        offline_router, pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(json_object=True))
    )
    assert sp.structured.kind == "json_object"
    _, sp = grpc_api.prepare(offline_router, pb.GenerateRequest(prompt="hi"))
    assert sp.structured is None
