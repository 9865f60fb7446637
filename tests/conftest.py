import os

import pytest

SHARED_VOCAB = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "vocab")


@pytest.fixture(scope="session")
def vocab_dir():
    """The real GPT-2 / BERT vocabularies (MEGATRON_VOCAB_DIR), or skip."""
    path = os.environ.get("MEGATRON_VOCAB_DIR")
    if not path and os.path.isdir(SHARED_VOCAB):
        path = SHARED_VOCAB
    if not path or not os.path.exists(os.path.join(path, "gpt2-vocab.json")):
        pytest.skip("real vocabularies not found: set MEGATRON_VOCAB_DIR")
    return os.path.abspath(path)
