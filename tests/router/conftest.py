"""Router fixtures that need no Ray: a Router whose tokenizer comes from the files a replica
group would send (ReplicaGroup.info()'s tokenizer_files)."""

from __future__ import annotations

import os

import pytest

from router.config import RouterConfig
from router.core import Router
from router.directory import StaticDirectory
from router.tokenize import Tokenizer
from router.validation import Limits


@pytest.fixture(scope="session")
def tokenizer_files(smollm2_tokenizer, tmp_path_factory) -> dict[str, bytes]:
    path = tmp_path_factory.mktemp("tok")
    smollm2_tokenizer.save_pretrained(path)
    return {name: (path / name).read_bytes() for name in os.listdir(path)}


@pytest.fixture()
def offline_router(tokenizer_files) -> Router:
    """A Router with limits and tokenizer set, as after start(), but no groups behind it."""
    r = Router(StaticDirectory([]), RouterConfig(max_n=4), model="tiny")
    r.tokenizer = Tokenizer(tokenizer_files)
    r.limits = Limits(max_model_len=64, vocab_size=49152, max_n=4, max_prompt_chars=1000)
    r.block_size = 8
    return r
