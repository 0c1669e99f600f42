"""Issue 22's request fields on the router (no Ray): chat_template_kwargs reach the template,
min_tokens and logit_bias become SamplingParams (HTTP and gRPC) or a 400 / INVALID_ARGUMENT
naming the field and the bad key or value."""

from __future__ import annotations

import asyncio

import pytest
from test_api_ext import _json, _request

from router import openai_api, utility_api
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
