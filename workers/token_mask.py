"""Allowed-token masks of grammar-constrained requests, applied to logits before sampling.

A mask is a packed bitmask: int32 words, bit j of word i allows token 32 * i + j (the layout
llguidance and xgrammar both fill). The engine builds one per constrained row per step; it
travels in the StepPlan (vocab / 8 bytes a row: 6 KB for SmolLM2's 49,152 tokens) and is
applied here, on the logits' device, before any argmax or draw.

Why an added 0-or-lowest row and not masked_fill(-inf): on this CPU torch's masked_fill and
where over a [1, 49152] float32 row took ~170-190 us, the unpack + add ~70 us. float32's lowest
(-3.4e38) acts as -inf for every later step: exp() of it is 0, a temperature > 1 keeps it far
below any logit, one < 1 turns it into -inf, and a grammar always allows at least one token.
"""

from __future__ import annotations

import torch

_BITS = {}  # device -> arange(32) shifts


def unpack_allowed(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, W] int32 words -> [N, vocab] float32 of 1.0 (allowed) / 0.0, on mask's device.
    Token ids past 32 * W (a model vocabulary wider than the tokenizer's) are disallowed."""
    bits = _BITS.get(mask.device)
    if bits is None:
        bits = _BITS[mask.device] = torch.arange(32, dtype=torch.int32, device=mask.device)
    allowed = ((mask[:, :, None] >> bits) & 1).flatten(1).float()
    width = allowed.shape[1]
    if width >= vocab:
        return allowed[:, :vocab]
    return torch.nn.functional.pad(allowed, (0, vocab - width))


def apply_token_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A float32 copy of `logits` [N, V] with the tokens `mask` [N, W] disallows pushed to
    float32's lowest value."""
    allowed = unpack_allowed(mask.to(logits.device), logits.shape[1])
    lowest = torch.finfo(torch.float32).min
    return logits.float() + (allowed - 1.0) * -lowest
