"""Request fields -> SamplingParams, or InvalidRequest naming the field and the limit."""

from __future__ import annotations

import json

import pytest

from router import grpc_api
from router.errors import ModelNotFound, api_error
from router.proto import flotilla_pb2 as pb
from router.validation import (
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    chat_params,
    completion_params,
    finalize,
    parse_body,
    seeded,
)
from workers.errors import InvalidRequest

LIMITS = Limits(max_model_len=64, vocab_size=1000, max_n=4)


def _completion(body: dict, n_prompt: int = 4):
    req = parse_body(json.dumps({"prompt": "hi"} | body).encode(), CompletionRequest)
    params, opts = completion_params(req, LIMITS)
    return finalize(params, opts, n_prompt, LIMITS), opts


def _field_of(fn) -> tuple[str, str]:
    with pytest.raises(InvalidRequest) as e:
        fn()
    return e.value.field, e.value.message


@pytest.mark.parametrize(
    ("body", "field", "limit"),
    [
        ({"temperature": -0.5}, "temperature", "greater than or equal to 0"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": 61}, "max_tokens", "at most 60"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"n": 5}, "n", "the limit is 4"),
        ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"stop": ["ok", ""]}, "stop", "non-empty"),
        ({"stop": ["x"] * 17}, "stop", "at most 16"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids.0", "valid integer"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({"echo": True, "logprobs": 1}, "echo", "echo with logprobs is not supported"),
        ({"suffix": "x"}, "suffix", "not supported"),
        ({"logit_bias": {"x1": 2}}, "logit_bias", "key 'x1' is not a token id"),
        ({"logit_bias": {"-1": 2}}, "logit_bias", "key '-1' is not a token id"),
        ({"logit_bias": {"7": 101}}, "logit_bias", "token 7: bias 101.0 is outside [-100, 100]"),
        ({"logit_bias": {"7": "high"}}, "logit_bias.7", "valid number"),
        ({"logit_bias": {"1000": 1}}, "logit_bias", "token id 1000 is outside the vocabulary"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "the limit is 300"),
        ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        ({"min_tokens": 17}, "min_tokens", "more than max_tokens=16"),
        ({"min_tokens": 1, "guided_regex": "a+"}, "min_tokens", "structured output"),
        ({"best_of": 3}, "best_of", "best_of == n"),
        ({"max_token": 5}, "max_token", "did you mean 'max_tokens'"),
    ],
)
def test_each_bad_completion_field_is_named(body, field, limit):
    got_field, message = _field_of(lambda: _completion(body))
    assert got_field == field
    assert limit in message


def test_min_tokens_logit_bias_and_skip_special_tokens_pass_through():
    sp, _ = _completion({"min_tokens": 3, "logit_bias": {"5": -100, "0": 2.5}})
    assert sp.min_tokens == 3 and sp.logit_bias == {5: -100.0, 0: 2.5} and sp.adjusts_logits
    assert sp.skip_special_tokens and not _completion({})[0].adjusts_logits
    sp, _ = _chat({"min_tokens": 2, "skip_special_tokens": False})
    assert sp.min_tokens == 2 and not sp.skip_special_tokens


def test_completion_defaults_and_pass_through():
    sp, opts = _completion({"temperature": 0, "stop": "\n", "top_k": 5, "seed": 3, "n": 2})
    assert sp.max_tokens == 16 and sp.temperature == 0 and sp.stop == ["\n"] and sp.top_k == 5
    assert opts.n == 2 and not opts.stream
    assert seeded(sp, 0).seed == 3 and seeded(sp, 1).seed == 4
    sp, opts = _completion({"stream": True, "stream_options": {"include_usage": True}})
    assert opts.stream and opts.include_usage


def test_prompt_limits():
    field, msg = _field_of(lambda: _completion({}, n_prompt=64))
    assert field == "prompt" and "max_model_len - 1 = 63" in msg
    field, _ = _field_of(lambda: _completion({}, n_prompt=0))
    assert field == "prompt"


def test_malformed_and_non_object_json():
    assert _field_of(lambda: parse_body(b"{nope", CompletionRequest))[0] == "body"
    assert _field_of(lambda: parse_body(b"[1, 2]", CompletionRequest))[0] == "body"
    assert _field_of(lambda: parse_body(b"\xff\xfe", CompletionRequest))[0] == "body"
    assert _field_of(lambda: parse_body(b"{}", CompletionRequest))[0] == "prompt"


def _chat(body: dict, n_prompt: int = 10):
    base = {"messages": [{"role": "user", "content": "hi"}]}
    req = parse_body(json.dumps(base | body).encode(), ChatCompletionRequest)
    params, opts = chat_params(req, LIMITS)
    return finalize(params, opts, n_prompt, LIMITS), opts


def test_chat_fields():
    sp, _ = _chat({})
    assert sp.max_tokens == 54  # no max_tokens: the rest of the context
    sp, _ = _chat({"max_completion_tokens": 7, "max_tokens": 3})
    assert sp.max_tokens == 7
    sp, _ = _chat({"logprobs": True, "top_logprobs": 3})
    assert sp.logprobs == 3
    assert _field_of(lambda: _chat({"messages": []}))[0] == "messages"
    assert _field_of(lambda: _chat({"messages": [{"role": "robot", "content": "x"}]}))[0] == (
        "messages.0.role"
    )
    assert _field_of(lambda: _chat({"top_logprobs": 2}))[0] == "top_logprobs"
    assert _field_of(lambda: _chat({"tools": [{"type": "function"}]}))[0] == (
        "tools[0].function.name"
    )


def test_router_tokenizes_like_the_engine(offline_router, smollm2_tokenizer):
    for text in ["Hello world", " leading  spaces", "Ünïcödé 🙂\n\nx"]:
        assert offline_router.tokenize(text) == smollm2_tokenizer.encode(text)
    msgs = [{"role": "user", "content": "Hi there"}]
    ids = offline_router.tokenizer.apply_chat_template(msgs)
    ref = smollm2_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ids == smollm2_tokenizer.encode(ref, add_special_tokens=False)
    assert offline_router.tokenizer.token_text(ids[-1]) == "\n"


def test_router_prompt_checks(offline_router):
    assert _field_of(lambda: offline_router.tokenize(""))[0] == "prompt"
    field, msg = _field_of(lambda: offline_router.tokenize("x" * 1001))
    assert field == "prompt" and "limit is 1000" in msg
    field, msg = _field_of(lambda: offline_router.tokenize([1, 2, 99999]))
    assert field == "prompt" and "99999" in msg


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (pb.GenerateRequest(), "input"),
        (pb.GenerateRequest(prompt=""), "prompt"),
        (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[])), "prompt_token_ids"),
        (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5, 10**6])), "prompt_token_ids"),
        (pb.GenerateRequest(messages=pb.ChatMessages()), "messages"),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(max_tokens=0)), "max_tokens"),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(max_tokens=500)), "max_tokens"),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(temperature=-1)), "temperature"),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(top_p=1.5)), "top_p"),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(logprobs=30)), "logprobs"),
        (pb.GenerateRequest(prompt="x", params=pb.SamplingParams(stop=[""])), "stop"),
        (pb.GenerateRequest(prompt="x " * 80), "prompt"),
    ],
)
def test_grpc_requests(offline_router, req, field):
    got, _ = _field_of(lambda: grpc_api.prepare(offline_router, req))
    assert got == field
    err = api_error(InvalidRequest(got, "m"))
    assert err.grpc_code.name == "INVALID_ARGUMENT" and err.http_status == 400


def test_grpc_request_ok_and_unknown_model(offline_router):
    req = pb.GenerateRequest(
        prompt="Hello", params=pb.SamplingParams(max_tokens=5, temperature=0.7, stop=["."])
    )
    ids, sp = grpc_api.prepare(offline_router, req)
    assert ids == offline_router.tokenize("Hello")
    assert sp.max_tokens == 5 and sp.temperature == 0.7 and sp.stop == ["."]
    with pytest.raises(ModelNotFound):
        grpc_api.prepare(offline_router, pb.GenerateRequest(model="other", prompt="x"))
