"""Rotary position embedding: the cos/sin tables (from transformers' own rope-init functions, so
every rope type transformers knows is computed its way) and the torch path's rotation."""

from __future__ import annotations

import torch

from workers.hf_config import HFConfig


def rope_tables(
    hf_config, head_dim: int, max_pos: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_pos, head_dim] in float32, from transformers' own rope-init functions.
    Computed on the CPU (the same bits on every device; transformers' functions are asked for
    CPU tensors), then moved to `device` (default: torch's default device, which the model
    runner sets to the model's while it builds the model)."""
    device = device or torch.get_default_device()
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    with torch.device("cpu"):  # also for the tensors transformers' functions make
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:  # these functions call the config object's methods: give them transformers' own
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if isinstance(hf_config, HFConfig):
                hf_config = hf_config.to_transformers()
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        freqs = torch.arange(max_pos, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos/sin: [T, 1, D] already in x's dtype
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
