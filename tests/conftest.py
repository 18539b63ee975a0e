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
