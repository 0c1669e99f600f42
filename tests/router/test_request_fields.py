"""Issue 22's request fields on the router (no Ray): chat_template_kwargs reach the template,
min_tokens and logit_bias become SamplingParams (HTTP and gRPC) or a 400 / INVALID_ARGUMENT
naming the field and the bad key or value."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from fake_groups import run
from test_api_ext import _Context, _json, _request

from router import grpc_api, openai_api, utility_api
from router.proto import flotilla_pb2 as pb
from router.tokenize import Tokenizer

# Qwen3's switch, reduced to what a test can see: the assistant turn opens with an empty think
# block when thinking is off.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def thinking_router(offline_router):
    offline_router.tokenizer.tok.chat_template = THINKING_TEMPLATE
    return offline_router


def _call(router, handler, body):
    return asyncio.run(_json(asyncio.run(handler(router, _request(body)))))


def test_chat_template_kwargs_reach_the_template(thinking_router):
    tok: Tokenizer = thinking_router.tokenizer
    off = tok.tok.decode(tok.apply_chat_template(HI, True, None, {"enable_thinking": False}))
    on = tok.tok.decode(tok.apply_chat_template(HI, True, None, {"enable_thinking": True}))
    assert off.endswith("assistant\n<think>\n\n</think>\n\n"), off
    assert on.endswith("assistant\n") and "<think>" not in on
    assert tok.tok.decode(tok.apply_chat_template(HI, True)) == on
    # /tokenize renders what /v1/chat/completions would send.
    body = {"messages": HI, "chat_template_kwargs": {"enable_thinking": False}}
    status, out, _ = _call(thinking_router, utility_api.tokenize, body)
    assert status == 200 and tok.tok.decode(out["tokens"]) == off


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ([1], "chat_template_kwargs"),
        ("enable_thinking", "chat_template_kwargs"),
        ({"tokenize": True}, "chat_template_kwargs.tokenize"),
        ({"chat_template": "{{ 7 * 7 }}"}, "chat_template_kwargs.chat_template"),
        ({"not a name": 1}, "chat_template_kwargs.not a name"),
        ({f"k{i}": i for i in range(33)}, "chat_template_kwargs"),
    ],
)
def test_bad_chat_template_kwargs_are_400_naming_the_key(thinking_router, kwargs, param):
    body = {"messages": HI, "chat_template_kwargs": kwargs}
    status, out, _ = _call(thinking_router, openai_api.chat_completions, body)
    assert status == 400 and out["error"]["param"] == param, out


# ---- min_tokens, logit_bias, skip_special_tokens ----------------------------------------------
def test_http_logit_bias_and_min_tokens_errors_name_the_field(offline_router):
    for body, param, words in [
        ({"logit_bias": {"abc": 1}}, "logit_bias", "'abc' is not a token id"),
        ({"logit_bias": {"3": -250}}, "logit_bias", "token 3: bias -250.0"),
        ({"logit_bias": {"49152": 1}}, "logit_bias", "token id 49152 is outside"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", "more than max_tokens=4"),
    ]:
        status, out, _ = _call(offline_router, openai_api.completions, {"prompt": "hi"} | body)
        assert status == 400 and out["error"]["param"] == param, out
        assert words in out["error"]["message"], out


def test_grpc_params_become_sampling_params(offline_router):
    params = pb.SamplingParams(
        max_tokens=8, min_tokens=2, logit_bias={5: 0.7, 9: -100}, skip_special_tokens=False
    )
    _, sp = grpc_api.prepare(offline_router, pb.GenerateRequest(prompt="hi", params=params))
    assert sp.min_tokens == 2 and sp.logit_bias == {5: 0.7, 9: -100.0}
    assert not sp.skip_special_tokens
    _, sp = grpc_api.prepare(offline_router, pb.GenerateRequest(prompt="hi"))
    assert sp.min_tokens == 0 and sp.logit_bias == {} and sp.skip_special_tokens


@pytest.mark.parametrize(
    ("params", "details"),
    [
        (pb.SamplingParams(logit_bias={5: 101}), "logit_bias: token 5: bias 101.0"),
        (pb.SamplingParams(logit_bias={-3: 1}), "logit_bias: token id -3 is negative"),
        (pb.SamplingParams(logit_bias={49152: 1}), "logit_bias: token id 49152 is outside"),
        (pb.SamplingParams(max_tokens=4, min_tokens=5), "min_tokens: 5 is more than max_tokens"),
    ],
)
def test_grpc_bad_params_are_invalid_argument(offline_router, params, details):
    ctx = _Context()
    asyncio.run(
        grpc_api.generate(offline_router, pb.GenerateRequest(prompt="hi", params=params), ctx)
    )
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details().startswith(details), ctx.details()


def test_grpc_finish_reason_code_next_to_the_string(tokenizer_files):
    async def body(r, groups):
        def req():
            return pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_tokens=3))

        out = [m async for m in grpc_api.generate_stream(r, req(), _Context())]
        assert [m.finish_reason_code for m in out] == [0, 0, pb.FINISH_REASON_LENGTH]
        assert out[-1].finish_reason == "length"
        for extra, code in [
            ({"finish": "stop", "stop": "a"}, pb.FINISH_REASON_STOP_STRING),
            ({"finish": "stop", "stop": 2}, pb.FINISH_REASON_STOP_TOKEN),
        ]:
            groups["g0"].last_extra = extra
            resp = await grpc_api.generate(r, req(), _Context())
            assert resp.finish_reason == "stop" and resp.finish_reason_code == code

    run(tokenizer_files, ["ok"], body)


# ---- /v1/completions: batched prompts and echo ----------------------------------------------
def test_batched_prompts_give_n_choices_each_in_order_with_summed_usage(tokenizer_files):
    async def body(r, groups):
        req = {"prompt": ["Hello", "Hi there"], "n": 2, "max_tokens": 3, "echo": True}
        status, out, _ = await _json(await openai_api.completions(r, _request(req)))
        assert status == 200, out
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        texts = [c["text"] for c in out["choices"]]
        assert texts == ["Helloaaa", "Helloaaa", "Hi thereaaa", "Hi thereaaa"]
        # The fake group counts 1 prompt token per request: once per prompt, not per choice.
        assert out["usage"]["prompt_tokens"] == 2 and out["usage"]["completion_tokens"] == 12
        tok = r.tokenizer
        assert sorted(groups["g0"].calls) == sorted(
            [tok.encode("Hello")] * 2 + [tok.encode("Hi there")] * 2
        )
        # Streamed: the same choices; each one's first event carries its echoed prompt.
        stream = req | {"prompt": [[5, 6], [7]], "n": 1, "stream": True}
        stream |= {"stream_options": {"include_usage": True}}
        status, out, _ = await _json(await openai_api.completions(r, _request(stream)))
        events = [json.loads(e[6:]) for e in out["events"] if e != "data: [DONE]\n\n"]
        text = {0: "", 1: ""}
        for e in events[:-1]:
            text[e["choices"][0]["index"]] += e["choices"][0]["text"]
        assert text == {0: tok.decode([5, 6]) + "aaa", 1: tok.decode([7]) + "aaa"}
        assert events[-1]["usage"]["prompt_tokens"] == 2

    run(tokenizer_files, ["ok"], body)


def test_batch_and_echo_limits(offline_router):
    for req, param, words in [
        ({"prompt": ["a"] * 33}, "prompt", "33 prompts; the limit is 32"),
        ({"prompt": ["a", ""]}, "prompt", "must not be empty"),
        ({"prompt": [[1], []]}, "prompt", "must not be empty"),
        ({"prompt": "a", "echo": True, "logprobs": 0}, "echo", "no prompt logprobs"),
    ]:
        status, out, _ = _call(offline_router, openai_api.completions, req)
        assert status == 400 and out["error"]["param"] == param, out
        assert words in out["error"]["message"], out


# ---- gRPC n ----------------------------------------------------------------------------------
def test_grpc_n_choices_unary_and_stream(tokenizer_files):
    async def body(r, groups):
        params = pb.SamplingParams(max_tokens=3, n=2)
        resp = await grpc_api.generate(
            r, pb.GenerateRequest(prompt="hi", params=params), _Context()
        )
        assert [c.index for c in resp.choices] == [0, 1]
        assert all(
            c.text == "aaa" and c.finish_reason_code == pb.FINISH_REASON_LENGTH
            for c in resp.choices
        )
        assert resp.text == "aaa" and resp.finish_reason == "length"
        assert resp.usage.prompt_tokens == 1 and resp.usage.completion_tokens == 6
        req = pb.GenerateRequest(prompt="hi", request_id="s-1", params=params)
        msgs = [m async for m in grpc_api.generate_stream(r, req, _Context())]
        by_index = {i: [m for m in msgs if m.index == i] for i in (0, 1)}
        assert len(msgs) == 6 and all(len(v) == 3 for v in by_index.values())
        for v in by_index.values():
            assert v[-1].finish_reason == "length" and v[-1].usage.completion_tokens == 3
        assert sorted(groups["g0"].calls + groups["g1"].calls) == [r.tokenize("hi")] * 4
        ctx = _Context()
        too_many = pb.SamplingParams(n=r.prompt_limits().max_n + 1)
        await grpc_api.generate(r, pb.GenerateRequest(prompt="hi", params=too_many), ctx)
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details().startswith("n: ")

    run(tokenizer_files, ["ok", "ok"], body)
