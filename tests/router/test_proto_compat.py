"""flotilla.proto only grows: every message field and rpc of an earlier release keeps its
number, name, type, presence and oneof, so clients built from the older .proto keep working
against this server (and new clients against an older one: unknown fields are skipped).

PREVIOUS is the descriptor of the proto as it was before GenerateRequest.request_id and the
Abort rpc were added (commit 5ae91bf), written out; add to it, never edit it, when the proto
gains fields.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from router.proto import flotilla_pb2 as pb

# fmt: off
PREVIOUS_MESSAGES: dict[str, list[tuple[int, str, str, str]]] = {
    "SamplingParams": [
        (1, "max_tokens", "optional uint32", ""), (2, "temperature", "optional float", ""),
        (3, "top_k", "optional int32", ""), (4, "top_p", "optional float", ""),
        (5, "min_p", "optional float", ""), (6, "seed", "optional uint64", ""),
        (7, "repetition_penalty", "optional float", ""),
        (8, "presence_penalty", "optional float", ""),
        (9, "frequency_penalty", "optional float", ""), (10, "stop", "repeated string", ""),
        (11, "stop_token_ids", "repeated uint32", ""), (12, "ignore_eos", "optional bool", ""),
        (13, "logprobs", "optional uint32", ""),
    ],
    "ChatMessage": [(1, "role", "string", ""), (2, "content", "string", "")],
    "TokenIds": [(1, "ids", "repeated uint32", "")],
    "GenerateRequest": [
        (1, "model", "string", ""), (2, "prompt", "string", "input"),
        (3, "prompt_token_ids", "TokenIds", "input"), (4, "messages", "ChatMessages", "input"),
        (5, "params", "SamplingParams", ""), (6, "session_id", "string", ""),
    ],
    "ChatMessages": [(1, "messages", "repeated ChatMessage", "")],
    "TopLogprob": [(1, "token_id", "uint32", ""), (2, "logprob", "float", ""),
                   (3, "token", "string", "")],
    "TokenLogprob": [(1, "token_id", "uint32", ""), (2, "logprob", "float", ""),
                     (3, "token", "string", ""), (4, "top", "repeated TopLogprob", "")],
    "Usage": [(1, "prompt_tokens", "uint32", ""), (2, "completion_tokens", "uint32", ""),
              (3, "total_tokens", "uint32", ""), (4, "cached_tokens", "uint32", "")],
    "GenerateResponse": [
        (1, "request_id", "string", ""), (2, "model", "string", ""), (3, "text", "string", ""),
        (4, "token_ids", "repeated uint32", ""), (5, "logprobs", "repeated TokenLogprob", ""),
        (6, "finish_reason", "string", ""), (7, "usage", "Usage", ""),
    ],
    "GenerateStreamResponse": [
        (1, "request_id", "string", ""), (2, "text", "string", ""),
        (3, "token_ids", "repeated uint32", ""), (4, "logprobs", "repeated TokenLogprob", ""),
        (5, "finish_reason", "string", ""), (6, "usage", "Usage", ""),
    ],
    "HealthRequest": [],
    "GroupHealth": [(1, "name", "string", ""), (2, "healthy", "bool", ""),
                    (3, "num_running", "uint32", ""), (4, "num_waiting", "uint32", ""),
                    (5, "kv_usage", "float", "")],
    "HealthResponse": [(1, "status", "string", ""), (2, "groups", "repeated GroupHealth", "")],
    "ListModelsRequest": [],
    "ModelInfo": [(1, "id", "string", ""), (2, "max_model_len", "uint32", ""),
                  (3, "owned_by", "string", "")],
    "ListModelsResponse": [(1, "models", "repeated ModelInfo", "")],
}
PREVIOUS_RPCS = [
    ("Generate", "GenerateRequest", "GenerateResponse", False),
    ("GenerateStream", "GenerateRequest", "GenerateStreamResponse", True),
    ("Health", "HealthRequest", "HealthResponse", False),
    ("ListModels", "ListModelsRequest", "ListModelsResponse", False),
]
# fmt: on

_TYPES = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}


def _current() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)


def _fields(msg: descriptor_pb2.DescriptorProto) -> list[tuple[int, str, str, str]]:
    out = []
    for f in msg.field:
        kind = f.type_name.rsplit(".", 1)[1] if f.type_name else _TYPES[f.type][5:].lower()
        if f.label == f.LABEL_REPEATED:
            kind = "repeated " + kind
        elif f.proto3_optional:
            kind = "optional " + kind
        real_oneof = f.HasField("oneof_index") and not f.proto3_optional
        out.append(
            (f.number, f.name, kind, msg.oneof_decl[f.oneof_index].name if real_oneof else "")
        )
    return out


def test_every_previous_field_is_unchanged():
    messages = {m.name: m for m in _current().message_type}
    for name, fields in PREVIOUS_MESSAGES.items():
        assert name in messages, f"message {name} was removed"
        now = _fields(messages[name])
        for field in fields:
            assert field in now, f"{name}: {field} changed or was removed"
        old_numbers = {f[0] for f in fields}
        for number, field_name, *_ in now:  # new fields take new numbers (and names)
            if number in old_numbers:
                continue
            assert field_name not in {f[1] for f in fields}, f"{name}.{field_name} renumbered"


def test_every_previous_rpc_is_unchanged():
    [service] = _current().service
    now = [
        (
            m.name,
            m.input_type.rsplit(".", 1)[1],
            m.output_type.rsplit(".", 1)[1],
            m.server_streaming,
        )  # fmt: skip
        for m in service.method
    ]
    for rpc in PREVIOUS_RPCS:
        assert rpc in now, f"rpc {rpc} changed or was removed"


def _old_classes() -> dict[str, type]:
    """Message classes of the previous proto, built at test time: today's descriptor cut down
    to PREVIOUS (under another package, in a pool of its own)."""
    fd = _current()
    fd.name, fd.package = "previous/flotilla.proto", "flotilla.previous"
    keep = []
    for m in fd.message_type:
        if m.name not in PREVIOUS_MESSAGES:
            continue
        copy = descriptor_pb2.DescriptorProto()
        copy.CopyFrom(m)
        numbers = {f[0] for f in PREVIOUS_MESSAGES[m.name]}
        del copy.field[:]
        for f in m.field:
            if f.number in numbers:
                field = copy.field.add()
                field.CopyFrom(f)
                if f.type_name:
                    field.type_name = f.type_name.replace(".flotilla.v1.", ".flotilla.previous.")
        # A oneof whose fields are all new (SamplingParams.structured) goes with them; the
        # kept fields' oneof indexes follow the ones left.
        used = sorted({f.oneof_index for f in copy.field if f.HasField("oneof_index")})
        decls = [m.oneof_decl[i] for i in used]
        del copy.oneof_decl[:]
        copy.oneof_decl.extend(decls)
        for f in copy.field:
            if f.HasField("oneof_index"):
                f.oneof_index = used.index(f.oneof_index)
        keep.append(copy)
    del fd.message_type[:]
    fd.message_type.extend(keep)
    del fd.service[:]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{fd.package}.{name}"))
        for name in PREVIOUS_MESSAGES
    }


def test_old_and_new_clients_interoperate_on_the_wire():
    old = _old_classes()
    params = {"max_tokens": 5, "temperature": 0.0, "stop": ["x"]}
    # An old client's request: the new server reads every field, request_id unset.
    sent = old["GenerateRequest"](prompt="hi", session_id="s", params=params)
    got = pb.GenerateRequest.FromString(sent.SerializeToString())
    assert (got.prompt, got.session_id, got.request_id) == ("hi", "s", "")
    assert got.params.HasField("temperature") and list(got.params.stop) == ["x"]
    # A new client's request at an old server: the fields it knows are intact, the new one is
    # kept as an unknown field (and survives a re-send).
    new = pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=[1, 2]),
        request_id="r-1",
        params=pb.SamplingParams(max_tokens=3, regex="[a-z]+"),
    )
    at_old = old["GenerateRequest"].FromString(new.SerializeToString())
    assert list(at_old.prompt_token_ids.ids) == [1, 2] and at_old.params.max_tokens == 3
    back = pb.GenerateRequest.FromString(at_old.SerializeToString())
    assert back.request_id == "r-1" and back.params.regex == "[a-z]+"
    # A new server's response at an old client.
    resp = pb.GenerateResponse(request_id="r-1", text="ok", usage=pb.Usage(total_tokens=3))
    at_old = old["GenerateResponse"].FromString(resp.SerializeToString())
    assert (at_old.request_id, at_old.text, at_old.usage.total_tokens) == ("r-1", "ok", 3)
