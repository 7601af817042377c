"""``SparseGPTConfig``: the settings of SparseGPT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...utils import check_int
from ..config import PruningConfig, check_number


__all__ = ["SparseGPTConfig"]


@dataclass
class SparseGPTConfig(PruningConfig):
    """SparseGPT: OBS weight reconstruction from the layer Hessian ``2/n Σ x xᵀ``.

    Args:
        blocksize: columns per lazy batch; the unstructured mask is chosen per block of this many
            columns. For N:M it is rounded down to a multiple of M (groups must not straddle blocks;
            the result does not depend on it otherwise).
        percdamp: damping ``λ = percdamp · mean(diag H)`` added to the Hessian's diagonal (> 0).

    Example:
        >>> SparseGPTConfig(sparsity="2:4").percdamp
        0.01
    """

    method: ClassVar[str] = "sparsegpt"

    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        self.blocksize = check_int("blocksize", self.blocksize, minimum=1)
        check_number(self, "percdamp", positive=True)
