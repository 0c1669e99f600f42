"""Tokenizer and chat template in the router process, without torch.

The replica group sends the files of the tokenizer its engine uses (`ReplicaGroup.info()`), so
the router tokenizes exactly as the engine would -- whatever the model format (a GGUF
vocabulary is converted by the group, once) -- and needs no model files of its own.
`PreTrainedTokenizerFast` is used directly: `AutoTokenizer` imports torch through the model
configs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

from workers.errors import InvalidRequest


class Tokenizer:
    def __init__(self, files: dict[str, bytes]):
        from transformers import PreTrainedTokenizerFast

        with tempfile.TemporaryDirectory(prefix="flotilla-router-tok-") as tmp:
            for name, data in files.items():
                if os.sep in name or name.startswith("."):
                    raise ValueError(f"unexpected tokenizer file name {name!r}")
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            self.tok = PreTrainedTokenizerFast.from_pretrained(tmp)
        self._token_text: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Same call as LLMEngine.tokenize (special tokens added as the tokenizer config says).
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text, special tokens included (what /detokenize returns)."""
        return self.tok.decode(list(token_ids))

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders `tools` (Hermes-style templates: Qwen2, Qwen3)."""
        template = getattr(self.tok, "chat_template", None)
        return isinstance(template, str) and "tools" in template

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """`template_kwargs`: extra render variables, checked by router.template_kwargs."""
        if not getattr(self.tok, "chat_template", None):
            raise InvalidRequest("messages", "this model has no chat template; use /v1/completions")
        try:
            text = self.tok.apply_chat_template(
                list(messages),
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **(template_kwargs or {}),
            )
        except Exception as e:  # a template raising on bad roles / order: the caller's error
            raise InvalidRequest("messages", f"chat template failed: {e}") from None
        # The rendered template already holds every special token it wants.
        return self.tok.encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """The text of one token, for logprobs (cached: the same ids recur)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tok.decode([token_id])
        return text
