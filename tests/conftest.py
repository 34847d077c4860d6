import os

import pytest
import torch

# Tests must not depend on a backend chosen in the caller's environment.
os.environ.pop("L1FX_BACKEND", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
