import os

import pytest
import torch

# Tests must not depend on a backend chosen in the caller's environment.
os.environ.pop("L1FX_BACKEND", None)

# pytest -n 2 runs two workers on two cores: one intra-op thread each avoids
# oversubscription (a PointNet++ forward went from 0.55 s to 0.015 s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
