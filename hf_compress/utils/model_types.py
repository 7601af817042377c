"""The ``model_type`` values hf_compress writes for folders that are not causal LMs, known to ``AutoConfig`` lazily.

A drafting-heads folder (``hf_compress_amphista`` / ``hf_compress_medusa``) or a CoSpec arbiter folder
(``hf_compress_cospec_arbiter``) looks like a model folder. The package that defines each one registers its config
with ``AutoConfig`` and, with ``AutoModelForCausalLM`` (which ``pipeline`` uses), a refusal that says what the folder
is and which calls decode with it. Importing those packages costs torch, so ``import hf_compress`` calls
:func:`register_lazily` instead: as soon as transformers' ``configuration_auto`` is imported (by the user's first
``from_pretrained``, or already), each model type gets a placeholder config class; the first folder of that type to
load imports the package in :data:`MODEL_TYPE_MODULES`, which registers the real classes over the placeholder, and
the placeholder hands the config to them. So after a bare ``import hf_compress``,
``AutoModelForCausalLM.from_pretrained(heads_folder)`` raises hf_compress's error instead of transformers' "does not
recognize this architecture ... upgrade transformers".

Example:
    >>> import hf_compress
    >>> from transformers import AutoConfig
    >>> sorted(MODEL_TYPE_MODULES)
    ['hf_compress_amphista', 'hf_compress_cospec_arbiter', 'hf_compress_medusa']
    >>> type(AutoConfig.for_model("hf_compress_medusa", num_heads=2)).__name__  # imports the heads package
    'MedusaConfig'
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, NoReturn


__all__ = ["HUB_DOWNLOAD_KWARGS", "MODEL_TYPE_MODULES", "NotThisModelClass", "hub_download_kwargs", "load_model_type",
           "register_lazily"]

MODEL_TYPE_MODULES: dict[str, str] = {
    "hf_compress_amphista": "hf_compress.speculative.heads",
    "hf_compress_medusa": "hf_compress.speculative.heads",
    "hf_compress_cospec_arbiter": "hf_compress.speculative.cospec",
}
"""``model_type`` → the package that registers its config (and what the Auto model classes do with it) on import."""

_REGISTRY_MODULE = "transformers.models.auto.configuration_auto"


def load_model_type(model_type: str) -> type:
    """Import the package of ``model_type`` and return its config class (now registered with ``AutoConfig``)."""
    importlib.import_module(MODEL_TYPE_MODULES[model_type])
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    if getattr(config_class, "hf_compress_placeholder", False):
        raise RuntimeError(f"Importing {MODEL_TYPE_MODULES[model_type]} did not register model type {model_type!r} "
                           "with AutoConfig; please report this to hf_compress.")
    return config_class


def register_lazily() -> None:
    """Register a placeholder for every model type once transformers' ``configuration_auto`` is imported."""
    from .import_hooks import when_imported

    when_imported(_REGISTRY_MODULE, _register_placeholders)


def _register_placeholders(configuration_auto: ModuleType) -> None:
    for model_type in MODEL_TYPE_MODULES:
        if model_type not in configuration_auto.CONFIG_MAPPING:  # never over the real classes, once registered
            # Not a PreTrainedConfig subclass: AutoConfig.register checks the model_type of those only, and the
            # placeholder needs none of their machinery. The real package registers over it (exist_ok=True).
            configuration_auto.AutoConfig.register(model_type, getattr(_Placeholders, model_type))


def _placeholder(model_type: str) -> type:
    """A config class that stands for ``model_type`` until its package is imported, then hands over to the real one."""

    class LazyModelTypeConfig:
        hf_compress_placeholder = True

        def __new__(cls, *args: Any, **kwargs: Any):  # AutoConfig.for_model(model_type, ...)
            # An instance of the real class is returned, so Python does not call this class's __init__.
            return load_model_type(model_type)(*args, **kwargs)

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):  # AutoConfig.from_pretrained(folder)
            return load_model_type(model_type).from_dict(config_dict, **kwargs)

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any):
            return load_model_type(model_type).from_pretrained(*args, **kwargs)

    LazyModelTypeConfig.model_type = model_type
    LazyModelTypeConfig.__qualname__ = f"{_Placeholders.__qualname__}.{model_type}"  # where pickle finds it
    return LazyModelTypeConfig


class _Placeholders:
    """The placeholder config classes, one attribute per model type, so that pickling ``CONFIG_MAPPING`` (which
    transformers supports) finds them by name."""


for _model_type in MODEL_TYPE_MODULES:
    setattr(_Placeholders, _model_type, _placeholder(_model_type))
del _model_type


HUB_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
"""The ``from_pretrained`` keywords that say where and how to download, which a config's own loader takes too."""


def hub_download_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The :data:`HUB_DOWNLOAD_KWARGS` among a ``from_pretrained`` call's ``kwargs``.

    Example:
        >>> hub_download_kwargs({"revision": "main", "dtype": "auto"})
        {'revision': 'main'}
    """
    return {key: kwargs[key] for key in HUB_DOWNLOAD_KWARGS if key in kwargs}


class NotThisModelClass:
    """Stands for ``config_class`` in an Auto model class's mapping (``AutoModelForCausalLM.register``) when folders
    of that config are not such a model: loading or building one raises a ``ValueError`` that says what it is.

    A subclass sets ``config_class`` and the two messages: :meth:`refusal` (for a folder, with its config) and
    :meth:`from_config_refusal` (for ``Auto*.from_config``).
    """

    config_class: type

    @classmethod
    def refusal(cls, source: str | os.PathLike, config: Any) -> str:
        raise NotImplementedError

    @classmethod
    def from_config_refusal(cls, config: Any) -> str:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, config: Any = None,
                        **kwargs: Any) -> NoReturn:
        if not isinstance(config, cls.config_class):  # called directly, not by an Auto class that read the config
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub_download_kwargs(kwargs))
        raise ValueError(cls.refusal(pretrained_model_name_or_path, config))

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any) -> NoReturn:  # what Auto*.from_config calls
        raise ValueError(cls.from_config_refusal(config))
