"""``ExpertRouter``: K PEFT LoRA experts on one base model, each batch row routed to its nearest centroid.

Routing embeds each row's prompt with the base model (adapters off, blocks up to the embedding layer
only) and picks the expert whose cluster centroid is most cosine-similar. Then one batch runs, one forward
per step, each row through its own LoRA weights: the experts stay ordinary PEFT adapters, and a batch that
mixes them runs either stacked (:mod:`.mixed`, the default: one adapter's amount of work) or through PEFT's
mixed-batch inference (``generate(adapter_names=[...])``, ``mixed_batch="peft"``).

The router is not a ``PreTrainedModel`` and does not pretend to be one: it wraps one (``router.model``, the
``PeftModel``) and exposes what ``transformers.pipeline("text-generation", model=router, tokenizer=...)`` reads of
a model (``config``, ``generation_config``, ``device``, ``dtype``, ``to``, ``can_generate``), so the pipeline's
batches go through :meth:`ExpertRouter.generate` and every prompt is routed. The pipeline checks the model's
class name against its causal-LM classes and the PEFT wrappers it accepts; a router adds its class name to the
latter when it is built (:func:`hf_compress._compat.accept_in_text_generation_pipeline`), so building the pipeline
logs no "The model 'ExpertRouter' is not supported for text-generation".
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import os
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig

from .. import _compat
from ..modeling.generation import generation_setting, inferred_attention_mask
from ..modeling.layers import find_decoder_blocks, kept_trainability
from ..utils import InvalidArgumentTypeError, get_logger
from ..utils.processes import main_process_only
from .clustering import assign
from .embedding import EmbeddingSpace, EmbeddingSpec, embed_batch, embed_texts
from .mixed import stacked_lora


if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedTokenizerBase
    from transformers.generation.utils import GenerateOutput
    from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["ExpertRouter"]

logger = get_logger(__name__)

MIXED_BATCH_PATHS = ("stacked", "peft")
"""How a batch whose rows go to different experts runs: ``"stacked"`` (every expert's LoRA update in two
matmuls per layer, :mod:`~hf_compress.experts.mixed`) or ``"peft"`` (PEFT's ``adapter_names=`` per-row path)."""


class ExpertRouter:
    """A ``PeftModel`` holding one LoRA adapter per expert, plus the centroids that route to them.

    Built by :func:`~hf_compress.experts.train_experts` or :meth:`from_pretrained` (or by hand, as below: a
    ``PeftModel`` with the adapters, one centroid per adapter in the :class:`EmbeddingSpace`). ``generate`` and
    ``__call__`` take the usual token batch (any padding side) and route every row; ``experts=[...]`` (indices)
    or ``adapter_names=[...]`` (names) override the routing. ``mixed_batch``: how a batch mixing experts runs
    (:data:`MIXED_BATCH_PATHS`; an attribute, so it can be switched on a loaded router).

    Like a model: ``to`` / ``cpu`` / ``cuda`` move ``router.model`` (the routing tensors stay on the CPU, where
    routing compares embeddings), ``eval()``, ``device``, ``dtype``, ``config``, ``generation_config``, and
    ``transformers.pipeline("text-generation", model=router, tokenizer=tokenizer)`` routes every prompt (see the
    module docstring). Routed calls run in eval mode (PEFT's per-row adapters are inference only), so
    ``train()`` is refused: train an expert as the PEFT adapter it is (``router.model.set_adapter(name)``).

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> from hf_compress.assets import tiny_model
        >>> from hf_compress.experts import EmbeddingSpace, EmbeddingSpec, ExpertRouter, embed_texts
        >>> base, tokenizer = tiny_model("llama")
        >>> prompts = ["3 + 4 = ", "Spell ABCDE: "]
        >>> spec = EmbeddingSpec.for_model(base)
        >>> raw = embed_texts(base, tokenizer, prompts, spec, progress=False)  # one centroid per prompt here
        >>> space = EmbeddingSpace.fit(raw)
        >>> lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        >>> model = get_peft_model(base, lora, adapter_name="math")
        >>> model.add_adapter("spelling", lora)
        >>> router = ExpertRouter(model, space(raw), space, spec, ["math", "spelling"], tokenizer=tokenizer).eval()
        >>> router.route_texts(["9 + 1 = ", "Spell QWXYZ: "]).tolist()
        [0, 1]
        >>> tokenizer.padding_side = "left"
        >>> batch = tokenizer(prompts, return_tensors="pt", padding=True)
        >>> router.generate(**batch, max_new_tokens=4, do_sample=False).shape  # each row through its expert
        torch.Size([2, 17])
        >>> router  # doctest: +ELLIPSIS
        ExpertRouter(2 experts ['math', 'spelling'] on LlamaForCausalLM, routing at decoder block 0 of 2 ...)
    """

    def __init__(self, model: PeftModel, centroids: torch.Tensor, space: EmbeddingSpace, spec: EmbeddingSpec,
                 adapter_names: Sequence[str], *, tokenizer: PreTrainedTokenizerBase | None = None,
                 info: dict[str, Any] | None = None, mixed_batch: str = "stacked") -> None:
        missing = [name for name in adapter_names if name not in getattr(model, "peft_config", {})]
        if missing:
            raise ValueError(f"The model has no adapter(s) {missing}; load every expert before routing to it.")
        if len(centroids) != len(adapter_names):
            raise ValueError(f"The router has {len(centroids)} centroids but {len(adapter_names)} experts; "
                             "every cluster needs exactly one expert adapter.")
        repeated = sorted(name for name, count in Counter(adapter_names).items() if count > 1)
        if repeated:
            raise ValueError(f"Adapter(s) {repeated} are named for more than one cluster; give each cluster its own "
                             "expert adapter.")
        if centroids.dim() != 2 or centroids.shape[1] != space.mean.shape[0]:
            raise ValueError(f"The centroids {tuple(centroids.shape)} do not fit the embedding space of width "
                             f"{space.mean.shape[0]}; pass one centroid [hidden] per expert, from that space.")
        self.mixed_batch = mixed_batch
        self.model = model
        self.centroids = torch.nn.functional.normalize(centroids.float(), dim=1)
        self.space = space
        self.spec = spec
        self.adapter_names = list(adapter_names)
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        # transformers.pipeline("text-generation", model=router) checks the model's class name; accept this one.
        _compat.accept_in_text_generation_pipeline(type(self).__name__)

    @property
    def mixed_batch(self) -> str:
        """How a batch mixing experts runs: one of :data:`MIXED_BATCH_PATHS`."""
        return self._mixed_batch

    @mixed_batch.setter
    def mixed_batch(self, path: str) -> None:
        if path not in MIXED_BATCH_PATHS:
            raise ValueError(f"mixed_batch must be one of {MIXED_BATCH_PATHS}, got {path!r}.")
        self._mixed_batch = path

    @property
    def num_experts(self) -> int:
        return len(self.adapter_names)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (where inputs go)."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------ like a model

    @property
    def dtype(self) -> torch.dtype:
        """The base model's floating-point dtype."""
        return self.model.dtype

    @property
    def config(self) -> PretrainedConfig:
        """The base model's config."""
        return self.model.config

    @property
    def generation_config(self) -> GenerationConfig:
        """The base model's generation config: the defaults of :meth:`generate`."""
        return self.model.generation_config

    @generation_config.setter
    def generation_config(self, config: GenerationConfig) -> None:
        self.model.generation_config = config

    @property
    def hf_device_map(self) -> dict[str, Any] | None:
        """The base model's accelerate device map, if it was loaded with one (a pipeline then moves nothing)."""
        return getattr(self.model, "hf_device_map", None)

    @property
    def input_modalities(self) -> Any:
        return self.model.input_modalities

    @property
    def output_modalities(self) -> Any:
        return self.model.output_modalities

    def can_generate(self) -> bool:
        """Whether the base model can ``generate`` (what ``transformers.pipeline`` asks a model)."""
        return bool(self.model.can_generate())

    @property
    def training(self) -> bool:
        """Whether the model is in training mode (routed calls switch it to eval mode)."""
        return self.model.training

    def to(self, *args: Any, **kwargs: Any) -> ExpertRouter:
        """Move or cast the model's parameters as ``torch.nn.Module.to`` does; returns the router.

        The centroids and the standardisation stay on the CPU in float32: routing pools the hidden states,
        brings them to the CPU and compares them there, whatever the model's device or dtype.
        """
        self.model.to(*args, **kwargs)
        return self

    def cpu(self) -> ExpertRouter:
        """``to("cpu")``."""
        return self.to("cpu")

    def cuda(self, device: int | torch.device | None = None) -> ExpertRouter:
        """``to`` the current (or the given) CUDA device."""
        self.model.cuda(device)
        return self

    def eval(self) -> ExpertRouter:
        """Put the model in eval mode (as every routed call does); returns the router."""
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> ExpertRouter:
        """``train(False)`` is :meth:`eval`; ``train()`` is refused: the router runs inference only."""
        if not mode:
            return self.eval()
        raise ValueError("ExpertRouter runs inference only: each call switches the model to eval mode (PEFT's "
                         "per-row adapters and the stacked mixed batch are inference paths). Train an expert as the "
                         "PEFT adapter it is (router.model.set_adapter(name); router.model.train()), or train new "
                         "experts with train_experts.")

    # ------------------------------------------------------------------------------------------ routing

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unit embeddings ``[batch, hidden]`` of the rows in the router's semantic space."""
        return self.space(embed_batch(self.model, input_ids, attention_mask, self.spec))

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Expert index of each row (``[batch]``, on the CPU); ``token_type_ids`` (some tokenizers return them)
        play no part.

        Example:
            >>> router.route(**tokenizer(["What is 2+2?"], return_tensors="pt"))  # doctest: +SKIP
            tensor([3])
        """
        if not isinstance(input_ids, torch.Tensor):
            hint = " (texts: route_texts(texts))" if isinstance(input_ids, (str, Sequence)) else ""
            raise InvalidArgumentTypeError(
                f"route takes token ids, a LongTensor [batch, length] (tokenizer(..., return_tensors='pt')), not "
                f"{type(input_ids).__name__}{hint}.")
        if self.num_experts == 1:  # nothing to choose: no embedding forward
            return torch.zeros(len(input_ids), dtype=torch.long, device="cpu")
        if attention_mask is None:  # padding inferred as generate() infers it, so both route a padded batch alike
            attention_mask = inferred_attention_mask(self.model, input_ids, {})
        return assign(self.embed(input_ids, attention_mask), self.centroids)

    def route_texts(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Expert index of each prompt text (tokenised with the router's tokenizer), ``[len(texts)]`` on the CPU."""
        if isinstance(texts, str):  # one prompt, not a sequence of one-letter prompts
            texts = [texts]
        if self.tokenizer is None:
            raise ValueError("This router has no tokenizer; pass tokenizer=... to from_pretrained, or route token ids.")
        if self.num_experts == 1 or not texts:
            return torch.zeros(len(texts), dtype=torch.long, device="cpu")
        raw = embed_texts(self.model, self.tokenizer, list(texts), self.spec, batch_size=batch_size, progress=False)
        return assign(self.space(raw), self.centroids)

    def adapter_names_for(self, experts: torch.Tensor | Sequence[int]) -> list[str]:
        """The PEFT adapter names of expert indices (what ``adapter_names=`` takes)."""
        indices = experts.tolist() if isinstance(experts, torch.Tensor) else list(experts)
        bad = [i for i in indices if not (isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                           and 0 <= i < self.num_experts)]
        if bad:
            raise ValueError(f"Expert indices must be in 0..{self.num_experts - 1}, got {bad[:5]}.")
        return [self.adapter_names[int(i)] for i in indices]

    def _experts_of(self, experts, kwargs: dict[str, Any]):
        """``experts=``, or PEFT's ``adapter_names=`` (popped from ``kwargs``) as expert indices."""
        names = kwargs.pop("adapter_names", None)
        if names is None:
            return experts
        if experts is not None:
            raise TypeError("Pass experts= (indices) or adapter_names= (names), not both.")
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise InvalidArgumentTypeError(f"adapter_names must be a list of adapter names, one per row, got "
                                           f"{type(names).__name__}.")
        unknown = sorted({name for name in names if name not in self.adapter_names}, key=str)
        if unknown:
            raise ValueError(f"adapter_names {unknown} are not experts of this router (it routes to "
                             f"{self.adapter_names}); for rows without an expert (PEFT's '__base__') or other "
                             "adapters, call router.model.generate(..., adapter_names=[...]) directly.")
        return [self.adapter_names.index(name) for name in names]

    def _routed(self, input_ids, attention_mask, experts, inputs_embeds=None) -> list[int]:
        given_embeddings = torch.is_tensor(inputs_embeds) and inputs_embeds.dim() == 3
        if input_ids is None and experts is not None and given_embeddings:
            # The experts are given: nothing to embed for routing, only one valid expert per row to check.
            return self._checked_experts(experts, inputs_embeds.shape[0])
        if input_ids is None:
            raise ValueError("No input_ids: there is nothing to route (an empty prompt, e.g. pipeline(\"\"), or "
                             "inputs_embeds, which routing cannot embed). Give each prompt some text, or pass "
                             "experts= (one expert index per row) with inputs_embeds.")
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise InvalidArgumentTypeError(
                f"input_ids must be a [batch, length] tensor of token ids, got "
                f"{tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}; tokenize with "
                "return_tensors='pt' (a single prompt is a batch of one).")
        if input_ids.shape[0] == 0:
            raise ValueError("The batch has no rows; pass at least one prompt.")
        if input_ids.shape[1] == 0:
            raise ValueError("The prompts are empty (input_ids has no tokens): there is nothing to route; give each "
                             "prompt some text.")
        return self._checked_experts(self.route(input_ids, attention_mask) if experts is None else experts,
                                     len(input_ids))

    def _checked_experts(self, experts, batch: int) -> list[int]:
        if len(experts) != batch:
            raise ValueError(f"experts has {len(experts)} entries for a batch of {batch} rows.")
        if self.model.training:
            # Per-row adapters are inference (PEFT refuses them in training mode; no dropout either).
            self.model.eval()
        self.adapter_names_for(experts)  # checks the indices
        return [int(i) for i in (experts.tolist() if isinstance(experts, torch.Tensor) else experts)]

    # ------------------------------------------------------------------------------------------ inference

    def generate(self, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | GenerationConfig | None = None, *,
                 experts: torch.Tensor | Sequence[int] | None = None,
                 **kwargs: Any) -> GenerateOutput | torch.LongTensor:
        """``generate()`` with every row routed to its expert; returns what ``model.generate`` returns.

        ``experts`` overrides the routing (one expert index per row), e.g. for an oracle; ``adapter_names``
        (PEFT's keyword: one of the router's expert names per row) does the same by name. Every other
        argument goes to ``PeftModel.generate``. Without ``attention_mask`` the padding is found as
        ``generate`` finds it (``pad_token_id`` tokens, unless it is also the end-of-sequence token), for the
        routing too. A ``GenerationConfig`` in the second place is taken as ``model.generate(inputs,
        generation_config)`` takes it.
        """
        if input_ids is None and torch.is_tensor(kwargs.get("inputs")):
            input_ids = kwargs.pop("inputs")
        experts = self._experts_of(experts, kwargs)
        if isinstance(attention_mask, GenerationConfig):  # generate(inputs, generation_config), as model.generate
            if kwargs.get("generation_config") is not None:
                raise TypeError("generate() got two generation configs: one positionally and generation_config=.")
            kwargs["generation_config"], attention_mask = attention_mask, None
        if attention_mask is not None and not torch.is_tensor(attention_mask):
            raise InvalidArgumentTypeError(
                f"attention_mask (the second positional argument) must be a tensor, got "
                f"{type(attention_mask).__name__}; pass other generate() settings by keyword.")
        if attention_mask is None and input_ids is not None:
            attention_mask = inferred_attention_mask(self.model, input_ids, kwargs)
        rows = self._routed(input_ids, attention_mask, experts, kwargs.get("inputs_embeds"))
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        copies = int(generation_setting(self.model, "num_return_sequences", kwargs) or 1)
        sampled = bool(generation_setting(self.model, "do_sample", kwargs))
        beams = int(generation_setting(self.model, "num_beams", kwargs) or 1)
        with self._adapters(rows) as per_row:
            if "adapter_names" in per_row and beams > 1 and "num_beams" not in kwargs:
                # PEFT repeats adapter_names for a num_beams *keyword* only; beams set in a generation config expand
                # the rows just the same, so repeat the names here.
                per_row = {"adapter_names": [name for name in per_row["adapter_names"] for _ in range(beams)]}
            elif "adapter_names" in per_row and copies > 1 and sampled and beams == 1:
                # PEFT repeats adapter_names for beams only: expand the rows here, as generate would.
                if input_ids is not None:
                    input_ids = input_ids.repeat_interleave(copies, dim=0)
                else:  # inputs_embeds with the experts given
                    kwargs["inputs_embeds"] = kwargs["inputs_embeds"].repeat_interleave(copies, dim=0)
                if attention_mask is not None:
                    kwargs["attention_mask"] = attention_mask.repeat_interleave(copies, dim=0)
                per_row = {"adapter_names": [name for name in per_row["adapter_names"] for _ in range(copies)]}
                given = kwargs.get("generation_config")
                if given is not None and "num_return_sequences" not in kwargs:
                    # Set on a copy of the given config: a keyword next to a generation_config is deprecated.
                    kwargs["generation_config"] = copy.deepcopy(given)
                    kwargs["generation_config"].num_return_sequences = 1
                else:
                    kwargs["num_return_sequences"] = 1
            return self.model.generate(input_ids=input_ids, **per_row, **kwargs)

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                 experts: torch.Tensor | Sequence[int] | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """A forward pass with every row routed to its expert (returns the model's output, e.g. logits);
        ``experts`` / ``adapter_names`` override the routing as in :meth:`generate`."""
        experts = self._experts_of(experts, kwargs)
        if experts is None and _compat.cache_from_model_kwargs(kwargs) is not None:
            raise ValueError(
                "A forward pass that continues from a cache sees only the new tokens, which would be routed on their "
                "own; pass the experts the first pass chose: experts = router.route(input_ids, attention_mask) before "
                "it, then router(..., cache=..., experts=experts) at each step. Or use router.generate(), which routes "
                "once.")
        rows = self._routed(input_ids, attention_mask, experts, kwargs.get("inputs_embeds"))
        with self._adapters(rows) as per_row:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **per_row, **kwargs)

    @contextlib.contextmanager
    def _adapters(self, rows: list[int]):
        """The keyword arguments that run each row through its expert (``rows``: one expert index per row).

        A batch routed to one expert runs with that adapter active (the previously active one is restored
        afterwards). A mixed batch runs through :func:`~hf_compress.experts.mixed.stacked_lora` (every
        expert's update in two matmuls per layer) or, with ``mixed_batch="peft"`` or LoRA variants it cannot
        stack, through PEFT's ``adapter_names=`` path. All three give the same numbers (tested).
        """
        if len(set(rows)) == 1:
            previous = self.model.active_adapter
            with kept_trainability(self.model):  # or a router loaded for inference would build autograd graphs
                self.model.set_adapter(self.adapter_names[rows[0]])
            try:
                yield {}
            finally:
                with kept_trainability(self.model):
                    self.model.set_adapter(previous)
            return
        if self.mixed_batch == "stacked":
            with stacked_lora(self.model, self.adapter_names, rows) as stacked:
                if stacked:
                    yield {}
                    return
        names = self.adapter_names_for(rows)
        dora = _compat.dora_adapters(self.model, sorted(set(names)))
        if dora:
            raise ValueError(f"Experts {dora} use DoRA, which PEFT cannot mix in one batch. Route first "
                             "(router.route(...)), then run each expert's rows as their own batch (experts=[i] * n).")
        with _compat.forward_pre_hooks_restored(self.model):
            try:
                yield {"adapter_names": names}
            except ValueError as error:
                if "Length of `adapter_names`" not in str(error):
                    raise
                # OPT and Qwen2-MoE run layers on the batch's tokens flattened together: PEFT cannot split those.
                raise ValueError(
                    f"{type(self.model.get_base_model()).__name__} runs some layers on the tokens of the whole batch "
                    "at once, which PEFT's per-row adapter_names path cannot split by row; use mixed_batch='stacked' "
                    "(the default), or run each expert's rows as their own batch."
                ) from error

    # ------------------------------------------------------------------------------------------ files

    def save_pretrained(self, save_dir: str | os.PathLike, *, overwrite: bool = False, metrics: Sequence[Any] = (),
                        model_name: str | None = None, repo_id: str | None = None) -> None:
        """Write the folder: ``experts_config.json``, ``router.safetensors``, one PEFT adapter folder per
        expert (each loadable with ``PeftModel.from_pretrained`` alone) and a ``README.md`` card; atomic.

        ``metrics``: measured ``MetricRecord`` rows for the card (none: the card says nothing was measured);
        ``repo_id``: the Hub id the card's loading snippet names (default: the model name).
        """
        from .folder import save_experts

        save_experts(self, save_dir, overwrite=overwrite, metrics=metrics, model_name=model_name, repo_id=repo_id)

    @main_process_only()
    def push_to_hub(self, repo_id: str, *, metrics: Sequence[Any] = (), **kwargs: Any) -> CommitInfo:
        """Save to a temporary folder and upload it with :func:`hf_compress.hub.push_to_hub` (``kwargs``)."""
        import tempfile

        from ..hub import DEFAULT_ALLOW_PATTERNS, push_to_hub

        # Each expert folder's card goes up too (the default allow-list takes README.md at the root only).
        kwargs.setdefault("allow_patterns", [*DEFAULT_ALLOW_PATTERNS, *(f"{n}/README.md" for n in self.adapter_names)])
        with tempfile.TemporaryDirectory() as scratch:
            folder = os.path.join(scratch, repo_id.rpartition("/")[2])
            self.save_pretrained(folder, metrics=metrics, repo_id=repo_id)
            return push_to_hub(folder, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base_model: torch.nn.Module, *,
                        tokenizer: PreTrainedTokenizerBase | None = None, revision: str | None = None,
                        **hub_kwargs: Any) -> ExpertRouter:
        """Load a saved expert folder (local, or a Hub repo id) onto ``base_model`` (a plain causal LM).

        PEFT's argument order, ``from_pretrained(base_model, path)``, is taken too, and so are the download keywords
        of ``from_pretrained``: ``subfolder`` (the folder inside ``path``), ``token``, ``cache_dir``,
        ``force_download`` and ``local_files_only``. Raises ``ValueError`` when the folder was trained on another
        base model, when its router and its adapters disagree, or when it is not an expert folder.

        Example:
            >>> router = ExpertRouter.from_pretrained("experts/", AutoModelForCausalLM.from_pretrained(base_id),
            ...                                       tokenizer=tokenizer)  # doctest: +SKIP
        """
        from .folder import load_experts

        if isinstance(path, torch.nn.Module) and isinstance(base_model, (str, os.PathLike)):
            path, base_model = base_model, path  # PeftModel.from_pretrained(model, model_id) order
        return load_experts(cls, path, base_model, tokenizer=tokenizer, revision=revision, **hub_kwargs)

    def __repr__(self) -> str:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        try:
            blocks = len(find_decoder_blocks(base)[1])
        except ValueError:
            blocks = "?"
        name = getattr(base, "name_or_path", None)
        on = f"{type(base).__name__}" + (f" {name!r}" if name else "")
        return (f"ExpertRouter({self.num_experts} experts {self.adapter_names} on {on}, routing at decoder block "
                f"{self.spec.layer} of {blocks} ({self.spec.pooling} of the first {self.spec.max_length} tokens), "
                f"mixed batches {self.mixed_batch!r}, {self.dtype} on {self.device})")
