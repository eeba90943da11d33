import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from tiny import chat_records, write_checkpoint, write_jsonl

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(1)  # tests use tiny tensors: one thread avoids contention overhead


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The trainer tests' inputs, built once a module: the tiny checkpoint directory and 40 chat
# records (a module that needs another checkpoint defines its own ``ckpt``).
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_records(40))
