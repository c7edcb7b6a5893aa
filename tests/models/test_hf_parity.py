"""Hugging Face parity of the foundation's architectures (tests/models/parity.py)."""
import pytest

from tiny_models import TINY_ARCHS
from parity import assert_matches_hf


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_greedy_and_logprobs_match_transformers(arch, tiny_model_factory):
    assert_matches_hf(tiny_model_factory(arch), block_size=16)
