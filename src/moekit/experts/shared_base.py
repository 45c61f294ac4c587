"""One frozen dense MLP seen as E identical experts: the base of a mixture of LoRA experts.

``SharedBaseExperts(num_experts, w_in, w_out)`` holds a dense FFN's weights once
and shows them through the stacked-MLP contract (``moekit.compute.mlp``) as E
experts: ``w_in`` is the (H, D) weight expanded to (E, H, D) without a copy, and so
on. ``LoRAExperts`` over it gives each expert its own adapters on the one shared
base: MixLoRA (Li et al. 2024), built by ``moekit.finetune.mixlora``. The weights are
frozen; since every expert is the same MLP, ``forward`` runs it once over all rows.

Not ``shardable``: the shared weights are not stacked by expert, so expert
parallelism would have to copy them to every rank.

Shapes: R routed rows, N rows of one expert, D model dim, F hidden dim, H first
projection width (2F for GLU kinds), E experts.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..compute.mlp import expert_mlp
from ..compute.ops import ACTIVATIONS
from .base import Experts
from .stacked import _GLU_ACTIVATION, KINDS


class SharedBaseExperts(Experts):
    """E experts that are all the dense MLP ``w_out · act(w_in · x + b_in) + b_out``.

    Args:
        num_experts: E.
        w_in: (H, D), ``nn.Linear`` layout; GLU kinds hold the gate rows, then the up rows.
        w_out: (D, F).
        b_in, b_out: optional biases (H,) and (D,).
        kind: ``swiglu``, ``geglu`` or ``ffn``.
        activation: the ``ffn`` kind's activation.

    The tensors are held as they are (no copy), as frozen parameters.
    """

    stacked_mlp = True
    shardable = False
    shared_base = True

    def __init__(self, num_experts: int, w_in: Tensor, w_out: Tensor, b_in: Tensor | None = None,
                 b_out: Tensor | None = None, *, kind: str = "swiglu", activation: str = "gelu"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown expert {kind!r}; valid kinds: {', '.join(KINDS)}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts ({num_experts!r}) must be a positive integer")
        activation = _GLU_ACTIVATION.get(kind, activation)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid activations: {', '.join(ACTIVATIONS)}")
        self.is_glu = kind in _GLU_ACTIVATION
        D, F = w_out.shape
        H = w_in.shape[0]
        if w_in.dim() != 2 or w_in.shape[1] != D or H != (2 * F if self.is_glu else F):
            raise ValueError(f"w_in {tuple(w_in.shape)} does not fit w_out {tuple(w_out.shape)} for {kind!r} "
                             f"experts: expected ({2 * F if self.is_glu else F}, {D})")
        self.num_experts, self.d_model, self.d_ff = num_experts, D, F
        self.kind, self.activation = kind, activation
        self.dense_w_in = nn.Parameter(w_in.detach(), requires_grad=False)
        self.dense_w_out = nn.Parameter(w_out.detach(), requires_grad=False)
        self.dense_b_in = None if b_in is None else nn.Parameter(b_in.detach(), requires_grad=False)
        self.dense_b_out = None if b_out is None else nn.Parameter(b_out.detach(), requires_grad=False)

    def _stacked(self, tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.expand(self.num_experts, *tensor.shape)

    # The stacked-MLP contract: the one dense weight seen E times (stride 0 on dim 0).
    w_in = property(lambda self: self._stacked(self.dense_w_in))
    w_out = property(lambda self: self._stacked(self.dense_w_out))
    b_in = property(lambda self: self._stacked(self.dense_b_in))
    b_out = property(lambda self: self._stacked(self.dense_b_out))

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Every expert is the same MLP: one pass over all rows."""
        return expert_mlp(self, 0, x_RD)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        return expert_mlp(self, e, x_ND)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, kind={self.kind!r}, "
                f"activation={self.activation!r}, bias={self.dense_b_in is not None}")
