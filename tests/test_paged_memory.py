"""Issue 9's memory targets on the real model, in fresh processes: memory follows the tokens in use."""

from __future__ import annotations

import pytest

from logitlab.bench_kv import generate_peak_rss_mb, idle_server_rss_mb, n_samples_blocks

pytestmark = pytest.mark.real_model


def test_3000_samples_of_a_short_prompt_fit_in_2_5_gb(gguf_path):
    # a static cache held 3000 slots x 2048 positions (~280 GB); the paged one holds the prompt once
    assert generate_peak_rss_mb("smollm2-135m-instruct", 3000) < 2500


def test_an_idle_server_holds_under_1_gb(gguf_path):
    assert idle_server_rss_mb("smollm2-135m-instruct") < 1000


def test_8_samples_of_a_500_token_prompt_hold_about_one_prompt(real_engine):
    res = n_samples_blocks(real_engine, 500, 8)
    assert res["peak_blocks"] <= res["prompt_blocks"] + 8 * 2  # + each sample's own last block(s)
    assert real_engine.scheduler.cache.used_blocks() == 0
