"""Recipe step kinds, one class per file, each mapping onto the library's own public API:

- ``prune``      (``prune.py``): any registered pruner, ``hf_compress.pruning.PRUNERS``;
- ``quantize``   (``quantize.py``): DL-QAT (PEFT + ``Trainer`` + ``merge_and_quantize``) or RTN;
- ``route``      (``route.py``): the token router, ``hf_compress.routing``;
- ``heads``      (``heads.py``): Amphista / Medusa drafting heads, ``hf_compress.speculative.heads``;
- ``generation`` (``generation.py``): a ``custom_generate`` strategy and/or a compressed KV cache.

``base.py`` holds the registry (``STEP_KINDS``), the run state and the order check; ``training.py`` the
``training:`` mapping the training steps share.
"""

from .base import STEP_KINDS, RecipeState, Step, check_order, model_facts, parse_step
from .generation import GenerationStep
from .heads import HeadsStep
from .prune import PruneStep
from .quantize import QuantizeStep
from .route import RouteStep


__all__ = [
    "STEP_KINDS",
    "GenerationStep",
    "HeadsStep",
    "PruneStep",
    "QuantizeStep",
    "RecipeState",
    "RouteStep",
    "Step",
    "check_order",
    "model_facts",
    "parse_step",
]
