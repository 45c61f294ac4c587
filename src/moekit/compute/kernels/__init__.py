"""Optional GPU kernels. Importing this package never needs Triton: ``HAS_TRITON``
says whether the Triton kernels can run."""

from .triton_grouped import (
    HAS_TRITON,
    gather_grouped_mm,
    grouped_mm_scatter,
    grouped_row_mm,
    grouped_weight_grad,
    interpreting,
    supported_dtypes,
)

__all__ = [
    "HAS_TRITON",
    "gather_grouped_mm",
    "grouped_mm_scatter",
    "grouped_row_mm",
    "grouped_weight_grad",
    "interpreting",
    "supported_dtypes",
]
