"""Hypothesis strategies for the request fuzzers (tests/deploy/test_fuzz.py): OpenAI-style JSON
bodies whose known fields take plausible values, values of the wrong type, huge or negative
numbers, NaN / infinities and odd unicode (lone surrogates, controls, astral planes); unknown
fields with odd names; random bytes as a body; flotilla.v1 messages with random field values;
random bytes and other messages' bytes as a serialized request.

Plausible values dominate on purpose: a body that fails at its first field never reaches the
code behind it. Generation stays short (max_tokens mostly 1..4) so valid requests are cheap.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

from router.proto import flotilla_pb2 as pb

# Unicode with what breaks encoders and headers: lone surrogates (valid in JSON escapes, not
# in UTF-8), NUL and other controls, combining marks, the astral planes, U+FFFF.
ODD_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec=None),
        st.sampled_from(["\ud800", "\udfff", "\x00", "\n", "\r", "\u0301", "\U0001f600", "\uffff"]),
    ),
    max_size=24,
)
HUGE_INTS = st.sampled_from([-(2**63), -1, 0, 2**31, 2**32, 2**63, 2**64, 10**30, -(10**30)])
ODD_FLOATS = st.sampled_from(
    [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300, 1e308, -1e308]
)

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    ODD_TEXT,
)
ANY_JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(ODD_TEXT, inner, max_size=4)
    ),
    max_leaves=12,
)


def field(valid: st.SearchStrategy, edge: st.SearchStrategy = st.nothing()) -> st.SearchStrategy:
    """A known field's value in a "dirty" body: valid, at an edge of its range, or anything."""
    return st.one_of(valid, valid, edge, ANY_JSON, HUGE_INTS, ODD_FLOATS)


def _body(required: dict, optional: dict) -> st.SearchStrategy:
    """A third clean (every field valid: the request reaches the engine), a third clean but for
    one field (so each field's checks are reached), a third dirty (any field may be wrong,
    unknown fields added)."""

    def pick(spec: dict, dirty: bool) -> dict:
        return {k: field(*v) if dirty else v[0] for k, v in spec.items()}

    clean = st.fixed_dictionaries(pick(required, False), optional=pick(optional, False))
    spec = required | optional
    one_bad = st.tuples(
        clean,
        st.sampled_from(sorted(spec)).flatmap(
            lambda k: st.tuples(st.just(k), field(st.nothing(), spec[k][1]))
        ),
    ).map(lambda c: {**c[0], c[1][0]: c[1][1]})
    dirty = st.tuples(
        st.fixed_dictionaries(pick(required, True), optional=pick(optional, True)), UNKNOWN
    ).map(lambda kv: {**kv[1], **kv[0]})
    return st.one_of(clean, one_bad, dirty)


SMALL_TEXT = st.sampled_from(
    ["Hello", "The capital of France is", "a b c", "é ü 中 😀", "lone \ud800"]
)
TOKEN_IDS = st.lists(st.integers(0, 49151), min_size=1, max_size=12)
BAD_TOKEN_IDS = st.lists(st.integers(-2, 2**40), max_size=12)
# (valid, edge) per field; max_tokens mostly small so a valid request stays cheap.
COMMON = {
    "model": (st.just("tiny"), st.just("other") | ODD_TEXT),
    "n": (st.integers(1, 3), st.integers(-1, 9)),
    "stream": (st.booleans(), st.just("yes")),
    "stream_options": (
        st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        st.just({"include_usag": True}),
    ),
    "stop": (
        st.one_of(SMALL_TEXT, st.lists(SMALL_TEXT, max_size=3)),
        st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=20), st.just(["x" * 2000])),
    ),
    "temperature": (st.floats(0, 2), st.floats(-1, 200)),
    "top_p": (st.floats(0.05, 1), st.floats(-0.5, 1.5)),
    "top_k": (st.integers(-1, 50), st.integers(-3, 2**40)),
    "min_p": (st.floats(0, 1), st.floats(-0.5, 1.5)),
    "seed": (st.integers(0, 2**63 - 1), st.integers(-5, 2**64)),
    "presence_penalty": (st.floats(-2, 2), st.floats(-3, 3)),
    "frequency_penalty": (st.floats(-2, 2), st.floats(-3, 3)),
    "repetition_penalty": (st.floats(0.5, 2), st.floats(-1, 11)),
    "stop_token_ids": (st.lists(st.integers(0, 49151), max_size=3), BAD_TOKEN_IDS),
    "ignore_eos": (st.booleans(), st.just(2)),
    "user": (SMALL_TEXT, ODD_TEXT),
    "logit_bias": (st.just({}), st.dictionaries(ODD_TEXT, st.floats(-100, 100), max_size=2)),
}
# Unknown fields: names close to known ones (refused as typos), odd names (ignored, named in a
# response header: must not break it).
UNKNOWN = st.dictionaries(
    st.one_of(st.sampled_from(["max_token", "temprature", "metadata", "store"]), ODD_TEXT),
    ANY_JSON,
    max_size=2,
)
MAX_TOKENS = (st.integers(1, 4), st.integers(-5, 2**40))
MESSAGE = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "user", "assistant"]), st.just("robot"))},
    optional={
        "content": field(
            SMALL_TEXT | st.none(),
            st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "image_url"]), "text": ODD_TEXT}
                ),
                max_size=3,
            )
            | ODD_TEXT,
        ),
        "name": field(SMALL_TEXT, ODD_TEXT),
    },
)
CLEAN_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.just("user"), "content": SMALL_TEXT}), min_size=1, max_size=2
)
MESSAGES = (CLEAN_MESSAGES, st.lists(MESSAGE, max_size=4))

CHAT_BODY = _body(
    {"messages": MESSAGES},
    COMMON
    | {
        "max_tokens": MAX_TOKENS,
        "max_completion_tokens": MAX_TOKENS,
        "logprobs": (st.booleans(), st.just(3)),
        "top_logprobs": (st.integers(0, 5), st.integers(-1, 25)),
        "add_generation_prompt": (st.booleans(), st.just(None)),
        "tools": (st.just([]), st.lists(ANY_JSON, min_size=1, max_size=1)),
        "tool_choice": (st.sampled_from(["none", "auto"]), st.just("required")),
        "response_format": (st.just({"type": "text"}), st.just({"type": "json_object"})),
    },
)
PROMPT = (
    SMALL_TEXT | TOKEN_IDS | st.lists(SMALL_TEXT, min_size=1, max_size=1),
    ODD_TEXT
    | BAD_TOKEN_IDS
    | st.lists(SMALL_TEXT, max_size=3)
    | st.lists(BAD_TOKEN_IDS, max_size=2),
)
COMPLETION_BODY = _body(
    {"prompt": PROMPT},
    COMMON
    | {
        "max_tokens": MAX_TOKENS,
        "logprobs": (st.integers(0, 5), st.integers(-1, 25)),
        "echo": (st.just(False), st.just(True)),
        "best_of": (st.just(1), st.integers(0, 3)),
        "suffix": (st.just(""), SMALL_TEXT),
    },
)
TOKENIZE_BODY = st.one_of(
    _body({"prompt": (SMALL_TEXT, ODD_TEXT | st.just("x" * 2000))}, {"model": COMMON["model"]}),
    _body(
        {"messages": MESSAGES},
        {"model": COMMON["model"], "add_generation_prompt": (st.booleans(), st.just(None))},
    ),
)
DETOKENIZE_BODY = _body({"tokens": (TOKEN_IDS, BAD_TOKEN_IDS)}, {"model": COMMON["model"]})

# Header values a client controls that the router or Serve's proxy reads, as raw bytes (not
# all UTF-8: HTTP allows any byte but CR, LF and NUL; leading whitespace is not sent).
HEADER_VALUE = st.one_of(
    st.sampled_from([b"abc", b"x" * 129, b"a b", "é".encode("latin-1"), "é".encode()]),
    st.binary(min_size=1, max_size=20).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"").lstrip() or b"x"
    ),
)
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "X-Request-Id": HEADER_VALUE,
        "x-session-id": HEADER_VALUE,
        "Authorization": HEADER_VALUE,
    },
)


def encode(body: object) -> bytes:
    """JSON as a client could send it: lone surrogates escaped, NaN / Infinity written as
    Python's json does (not JSON, but what the server's parser must survive)."""
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


RAW_BODY = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"null", b"[]", b"{", b'{"prompt": "a"', b"\xff\xfe", b'"x"', b"1e999"]),
    ANY_JSON.map(encode),
)

# ---- gRPC -------------------------------------------------------------------------------------
# Proto strings must be valid UTF-8: the client refuses lone surrogates, so leave them out.
PROTO_TEXT = st.one_of(
    st.sampled_from(["Hello", "The capital of France is", ""]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=24),
)
UINT32 = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))
FLOAT32 = st.one_of(st.floats(-3, 3, width=32), st.floats(width=32))


# SamplingParams fields: (valid, any value its wire type can carry).
SAMPLING_FIELDS = {
    "max_tokens": (st.integers(1, 4), UINT32),
    "temperature": (st.floats(0, 2, width=32), FLOAT32),
    "top_k": (st.integers(-1, 50), st.integers(-(2**31), 2**31 - 1)),
    "top_p": (st.floats(0.0625, 1, width=32), FLOAT32),
    "min_p": (st.floats(0, 1, width=32), FLOAT32),
    "seed": (st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1)),
    "repetition_penalty": (st.floats(0.5, 2, width=32), FLOAT32),
    "presence_penalty": (st.floats(-2, 2, width=32), FLOAT32),
    "frequency_penalty": (st.floats(-2, 2, width=32), FLOAT32),
    "stop": (
        st.lists(st.sampled_from(["a", "é", "\n\n"]), max_size=3),
        st.lists(PROTO_TEXT, max_size=20),
    ),
    "stop_token_ids": (st.lists(st.integers(0, 49151), max_size=3), st.lists(UINT32, max_size=70)),
    "ignore_eos": (st.booleans(), st.booleans()),
    "logprobs": (st.integers(0, 5), UINT32),
}
PROMPT_IDS = st.lists(st.integers(0, 49151), min_size=1, max_size=12)
CHAT = st.lists(
    st.builds(pb.ChatMessage, role=st.just("user"), content=st.sampled_from(["Hi", "é 中"])),
    min_size=1,
    max_size=2,
)
# GenerateRequest fields (the oneof input as three of them, at most one set).
REQUEST_FIELDS = {
    "prompt": (st.sampled_from(["Hello", "The capital of France is"]), PROTO_TEXT),
    "prompt_token_ids": (
        PROMPT_IDS.map(lambda ids: pb.TokenIds(ids=ids)),
        st.lists(UINT32, max_size=12).map(lambda ids: pb.TokenIds(ids=ids)),
    ),
    "messages": (
        CHAT.map(lambda ms: pb.ChatMessages(messages=ms)),
        st.lists(st.builds(pb.ChatMessage, role=PROTO_TEXT, content=PROTO_TEXT), max_size=4).map(
            lambda ms: pb.ChatMessages(messages=ms)
        ),
    ),
    "model": (st.sampled_from(["", "tiny"]), PROTO_TEXT),
    "session_id": (st.sampled_from(["", "s1"]), PROTO_TEXT),
    "request_id": (st.just(""), st.sampled_from(["x" * 200, "a b", "rid-1"]) | PROTO_TEXT),
}
_INPUTS = ("prompt", "prompt_token_ids", "messages")


def _request(fields: dict, params: dict) -> pb.GenerateRequest:
    return pb.GenerateRequest(**fields, params=pb.SamplingParams(**params))


def _clean(spec: dict, optional: tuple[str, ...]) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional={k: spec[k][0] for k in optional})


CLEAN_REQUEST = st.tuples(
    st.sampled_from(_INPUTS).flatmap(lambda k: REQUEST_FIELDS[k][0].map(lambda v: {k: v})),
    _clean(REQUEST_FIELDS, ("model", "session_id", "request_id")),
    _clean(SAMPLING_FIELDS, tuple(SAMPLING_FIELDS)),
).map(lambda t: (t[0] | t[1], t[2]))


def _one_bad(spec: dict, in_params: bool) -> st.SearchStrategy:
    """A clean request but for one field of `spec`, which takes any value of its wire type."""
    bad = st.sampled_from(sorted(spec)).flatmap(lambda k: spec[k][1].map(lambda v: (k, v)))

    def apply(clean_and_bad):
        (fields, params), (k, v) = clean_and_bad
        if in_params:
            return _request(fields, params | {k: v})
        if k in _INPUTS:
            fields = {n: x for n, x in fields.items() if n not in _INPUTS}
        return _request(fields | {k: v}, params)

    return st.tuples(CLEAN_REQUEST, bad).map(apply)


GENERATE_REQUEST = st.one_of(
    CLEAN_REQUEST.map(lambda t: _request(*t)),
    _one_bad(SAMPLING_FIELDS, in_params=True),
    _one_bad(REQUEST_FIELDS, in_params=False),
    st.builds(
        _request,
        st.fixed_dictionaries(
            {}, optional={k: v[1] for k, v in REQUEST_FIELDS.items() if k not in _INPUTS}
        ),
        st.fixed_dictionaries({}, optional={k: v[1] for k, v in SAMPLING_FIELDS.items()}),
    ),
)
ABORT_REQUEST = st.builds(pb.AbortRequest, request_id=PROTO_TEXT | st.just("x" * 300))
# Bytes a proto parser must survive: random, another message's, truncated.
RAW_PROTO = st.one_of(
    st.binary(max_size=200),
    GENERATE_REQUEST.map(lambda m: m.SerializeToString()[:-1]),
    st.builds(pb.Usage, prompt_tokens=UINT32, completion_tokens=UINT32).map(
        lambda m: m.SerializeToString()
    ),
    GENERATE_REQUEST.map(lambda m: m.params.SerializeToString()),
)
