"""Shared fixtures: the real model is loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def gguf_path():
    from logitlab.weights import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def real_weights():
    from logitlab.weights import DEFAULT_MODEL, load_weights

    return load_weights(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def real_tokenizer(real_weights):
    return real_weights.tokenizer


@pytest.fixture(scope="session")
def real_model(real_weights):
    from logitlab.model.transformer import Transformer

    return Transformer.from_state_dict(real_weights.config, real_weights.state_dict)


@pytest.fixture(scope="session")
def real_engine(real_weights, real_model):
    from logitlab.engine import Engine

    return Engine(
        real_model, real_weights.tokenizer, name="smollm2-135m-instruct", max_batch=32, max_len=2048
    )


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning threads cost 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
