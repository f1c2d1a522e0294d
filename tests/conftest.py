"""Shared test helpers: where the fixtures are."""
import pathlib

import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODELS = ["b13-alibi-h8-l4-bf16", "b7-rope-h4-l3-fp16"]     # tiny seeded Baichuan-13B / 7B (SPEC §8)


@pytest.fixture(params=MODELS)
def model_fixture(request):
    """Each fixture model's directory: hf/ (.bin shards), hf-safetensors/, golden.npz, meta.json."""
    return FIXTURES / request.param
