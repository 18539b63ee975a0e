import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("METAGRAD_TEST_THREADS", "2")))

OMNIGLOT = Path(os.environ.get("METAGRAD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")) \
    / "omniglot"


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from a second one, and lose 10-20x on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
