import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. Triton picks
# the interpreter when a kernel is defined (at import of the module holding it), so
# this must come before any test module imports moekit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests use tiny tensors, for which a second intra-op thread only adds
# hand-off latency (severe on a shared, oversubscribed machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
