import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Two cores: keep intra-op threads low so tests running beside other work stay predictable.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
