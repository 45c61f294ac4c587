"""Expert parallelism over ``torch.distributed``: one home for the dispatcher, the collectives,
the mesh and DDP helpers, canonical checkpoint state and the training-side reductions.

See docs/distributed.md.
"""

from .collectives import all_reduce_sum, all_to_all_rows, check_received_counts, check_send_splits
from .dispatcher import ExchangePlan, ExpertParallelDispatcher
from .setup import (
    DEFAULT_TIMEOUT_S,
    average_gradients,
    check_fingerprints,
    config_fingerprint,
    data_parallel,
    expert_parallel,
    expert_parallel_mesh,
    expert_parameter_names,
    init_distributed,
    moe_layers,
    reduce_expert_gradients,
    sharded_layers,
)
from .state import (
    full_optimizer_tensors,
    full_state_dict,
    is_sharded,
    load_full_state_dict,
    shard_optimizer_tensors,
    shard_state_dict,
)
from .training import (
    ParallelContext,
    clip_grad_norm,
    parallelize,
    reduce_gradients,
    reduce_routing_sums,
    setup_parallel,
)

__all__ = [
    "DEFAULT_TIMEOUT_S", "ExchangePlan", "ExpertParallelDispatcher", "ParallelContext", "all_reduce_sum",
    "all_to_all_rows", "average_gradients", "check_fingerprints", "check_received_counts", "check_send_splits",
    "clip_grad_norm", "config_fingerprint", "data_parallel", "expert_parallel", "expert_parallel_mesh",
    "expert_parameter_names", "full_optimizer_tensors", "full_state_dict", "init_distributed", "is_sharded",
    "load_full_state_dict", "moe_layers", "parallelize", "reduce_expert_gradients", "reduce_gradients",
    "reduce_routing_sums", "setup_parallel", "shard_optimizer_tensors", "shard_state_dict", "sharded_layers",
]
