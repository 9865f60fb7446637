import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models run fastest on one thread (and do not fight parallel test jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
