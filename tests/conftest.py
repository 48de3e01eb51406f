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


@pytest.fixture
def record_train_metrics():
    """``record(trainer)`` returns a list that receives, at each log, a copy of the trainer's training
    metrics (lists of per-step values) before they are averaged and cleared."""

    def record(trainer):
        history = []
        original = trainer.log

        def log(logs, start_time=None):
            if trainer._metrics["train"]:
                history.append({k: list(v) for k, v in trainer._metrics["train"].items()})
            original(logs, start_time)

        trainer.log = log
        return history

    return record
