import pytest
import torch

# Tests use tiny tensors, for which a second intra-op thread only adds
# hand-off latency (severe on a shared, oversubscribed machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
