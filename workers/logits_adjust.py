"""Per-request changes to the logits before sampling: `logit_bias` and `min_tokens`.

* `logit_bias` (OpenAI's): the value is added to that token's logit, for greedy and sampled
  rows alike (+100 all but forces the token, -100 all but bans it).
* `min_tokens`: while fewer than min_tokens tokens were generated, the request's stop token ids
  are set to -inf. The engine has folded the EOS ids into `stop_token_ids` for such a request
  (cluster.engine: the same finish for either), because a worker has no tokenizer to know them.

Both come after the raw logprobs a client sees (those describe the model, as in vLLM) and
before penalties, grammar masks and the draw. Work is per adjusted row only: a batch without
such requests returns its logits untouched, with no copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from workers.sampler import SamplingState


def _banned(st: SamplingState) -> list[int]:
    p = st.params
    if len(st.token_ids) - st.prompt_len >= p.min_tokens:  # outputs fed so far
        return []
    return p.stop_token_ids


def adjust(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """`logits` [N, V], or a float32 copy with each row's bias added and its banned tokens at
    -inf (the caller's tensor is left as it was). Ids past V (a bias for a token the model's
    head does not have) are ignored."""
    rows = [(i, st.params.logit_bias, _banned(st)) for i, st in enumerate(states)]
    rows = [r for r in rows if r[1] or r[2]]
    if not rows:
        return logits
    out = logits.float().clone()
    vocab, dev = out.shape[1], out.device
    for i, bias, banned in rows:
        ids = [t for t in bias if t < vocab]
        if ids:
            add = torch.tensor([bias[t] for t in ids], dtype=out.dtype, device=dev)
            out[i, torch.tensor(ids, device=dev)] += add
        banned = [t for t in banned if t < vocab]
        if banned:
            out[i, torch.tensor(banned, device=dev)] = float("-inf")
    return out
