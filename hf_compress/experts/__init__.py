"""SilverSight / ASSL: semantic expert routing over PEFT LoRA experts, and adaptive data selection.

The base model's own hidden states give a semantic space (:mod:`.embedding`). In it, :func:`select_data`
keeps the examples that cover the space best (facility location, :mod:`.selection`), :func:`train_experts`
clusters the data with k-means and trains one ordinary PEFT LoRA adapter per cluster through ``Trainer``,
and :class:`ExpertRouter` sends each row of a batch to the expert of its nearest centroid (one forward for
the whole batch; experts mixed in a batch run stacked, :mod:`.mixed`, or through PEFT's ``adapter_names``).
Saved folders hold one PEFT adapter per expert, the router and a model card (:mod:`.folder`).

Example:
    >>> from hf_compress.experts import ExpertConfig, ExpertRouter, select_data, train_experts
    >>> subset = select_data(dataset, model, budget=0.2)  # doctest: +SKIP
    >>> experts = train_experts(model, subset, ExpertConfig(num_experts=4, r=8), args=args)  # doctest: +SKIP
    >>> experts.save_pretrained("experts/")  # doctest: +SKIP
    >>> router = ExpertRouter.from_pretrained("experts/", base_model=fresh_base)  # doctest: +SKIP
    >>> router.generate(**tokenizer(prompts, return_tensors="pt", padding=True))  # doctest: +SKIP
    >>> pipeline("text-generation", model=router, tokenizer=tokenizer)(prompts)  # doctest: +SKIP
"""

from ..utils.import_hooks import lazy_exports


# Names load on first use: the CLI registers the experts commands without importing torch.
_EXPORTS = {
    "ExpertConfig": "config",
    **dict.fromkeys(("instruction_rows", "packed_instruction_dataset"), "data"),
    **dict.fromkeys(("EmbeddingSpace", "EmbeddingSpec", "embed_texts"), "embedding"),
    "stacked_lora": "mixed",
    "completion_losses": "need",
    **dict.fromkeys(("MIXED_BATCH_PATHS", "ExpertRouter"), "router"),
    **dict.fromkeys(("SELECTION_METHODS", "SelectionReport", "coverage", "select_data", "select_indices"), "selection"),
    "train_experts": "training",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
