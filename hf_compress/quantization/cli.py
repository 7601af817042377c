"""``hf-compress quantize dlqat|rtn``: quantize a model to packed low-bit weights from the command line.

``dlqat`` trains a DL-QAT adapter with ``Trainer`` on ``--calibration-text`` (default: the Wikipedia calibration
split), then exports it with ``merge_and_quantize()``. ``rtn`` packs the round-to-nearest weights with no
training. Either way ``--save-dir`` receives an ``hf_compress_packed`` checkpoint (with the tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads after ``import hf_compress``. ``--adapter-dir`` also keeps
the trained adapter (``PeftModel.from_pretrained(base, adapter_dir)``). Both folders get a model card
with the recipe (and no metrics: this command measures none; ``hf-compress eval`` does).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from ..cli.config_flags import AppendSplit
from ..cli.main import (
    DEFAULT_CALIBRATION_TEXT,
    calibration_text_argument,
    calibration_text_record,
    command,
    device_argument,
    dtype_argument,
    int_at_least,
    positive_float,
    refuse_unused_flags,
    resolve_device,
)


# The flags only `quantize dlqat` reads, with their defaults. The parser leaves them None, so that a flag the user gave
# (refused with rtn, which would ignore it) stands apart from one left out; refuse_unused_flags then fills these in.
_DLQAT_ONLY_DEFAULTS: dict[str, Any] = {
    "rank": 16, "lora_alpha": None, "steps": 100, "learning_rate": 1e-3, "batch_size": 4, "seq_len": 256,
    "no_magnitude": False, "no_lora": False, "adapter_dir": None, "calibration_text": DEFAULT_CALIBRATION_TEXT,
}


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=("dlqat", "rtn"), help="DL-QAT training, or round-to-nearest")
    parser.add_argument("--model", default="smollm2-135m",
                        help="reference name, tiny-<arch>, folder or Hub id (default: smollm2-135m)")
    parser.add_argument("--bits", type=int, default=4, help="weight bits, 2 to 8 (default 4)")
    parser.add_argument("--group-size", type=int, default=128, help="inputs per group; -1 per-channel (default 128)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid (default asymmetric)")
    # dlqat only (see _DLQAT_ONLY_DEFAULTS for the defaults): None marks a flag the user left out.
    parser.add_argument("--skip", action=AppendSplit, default=[],
                        help="decoder-block layers kept in full precision: comma-separated fnmatch patterns of their "
                             "names, e.g. '*down_proj' or 'model.layers.0.*' (default: quantize them all)")
    parser.add_argument("--rank", type=int_at_least(1), default=None, help="dlqat: LoRA rank (default 16)")
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help="dlqat: LoRA scaling numerator, the update being lora_alpha / rank * B @ A "
                             "(default: the rank)")
    parser.add_argument("--steps", type=int_at_least(1), default=None, help="dlqat: Trainer steps (default 100)")
    parser.add_argument("--learning-rate", type=positive_float, default=None,
                        help="dlqat: AdamW learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None,
                        help="dlqat: sequences per step (default 4)")
    parser.add_argument("--seq-len", type=int_at_least(2), default=None,
                        help="dlqat: tokens per sequence (default 256)")
    parser.add_argument("--no-magnitude", action="store_true", default=None,
                        help="dlqat ablation: LoRA only (not with --no-lora)")
    parser.add_argument("--no-lora", action="store_true", default=None,
                        help="dlqat ablation: group magnitudes only (not with --no-magnitude)")
    parser.add_argument("--save-dir", required=True, help="folder for the packed low-bit checkpoint")
    parser.add_argument("--adapter-dir", default=None, help="dlqat: also save the trained adapter here")
    calibration_text_argument(parser, default=None, help_prefix="dlqat: training text, ")
    device_argument(parser)  # rtn packs there; dlqat trains there (Trainer places the model: see run_quantize)
    dtype_argument(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="save into a non-empty --save-dir / --adapter-dir: the model or adapter there is "
                             "replaced, other files are kept")


@command("quantize", "quantize a model to packed low-bit weights (DL-QAT training or RTN)", _arguments)
def run_quantize(args: argparse.Namespace) -> int:
    from peft import get_peft_model

    from .. import _compat
    from ..assets import load_calibration_text, load_model
    from ..training import TrainingSettings, causal_lm_dataset, is_main_process, train_with_trainer
    from ..formats.packed import check_not_packed, save_packed
    from ..hub import base_model_of, base_weights_of, write_model_card
    from ..modeling.layers import check_skip_patterns, check_within_learned_positions, skipped_layer_names
    from ..utils import atomic_directory, check_save_dir, folders_overlap
    from ..evaluation.memory import disk_bytes
    from . import DLQATConfig, packed_size, quantize_rtn

    _check_method_flags(args)
    check_save_dir(args.save_dir, args.overwrite, argument="--save-dir")
    if args.adapter_dir:
        check_save_dir(args.adapter_dir, args.overwrite, argument="--adapter-dir")
    if args.adapter_dir:
        if folders_overlap(args.save_dir, args.adapter_dir):
            raise ValueError(f"--adapter-dir {args.adapter_dir} and --save-dir {args.save_dir} are the same folder or "
                             "one holds the other: each save replaces its whole folder. Pass two separate folders.")
    device = resolve_device(args.device)  # checked before the model loads
    settings = None
    if args.method == "dlqat":  # Trainer places the model itself: the settings' device keeps it where --device says
        settings = TrainingSettings(max_steps=args.steps, learning_rate=args.learning_rate,
                                    per_device_batch_size=args.batch_size, logging_steps=max(1, args.steps // 10),
                                    progress=not args.quiet, device=device)
    # A bad text file is reported before the (possibly slow) model load; rtn trains on nothing.
    text = load_calibration_text(args.calibration_text) if args.method == "dlqat" else None
    config = DLQATConfig(
        bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, r=args.rank,
        lora_alpha=float(args.lora_alpha if args.lora_alpha is not None else args.rank), target_modules="all-linear",
        use_magnitude=args.method == "dlqat" and not args.no_magnitude,
        use_lora=args.method == "dlqat" and not args.no_lora,
        task_type="CAUSAL_LM",  # a saved adapter then loads as PeftModelForCausalLM (pipeline() accepts it quietly)
    )
    model, tokenizer = load_model(args.model, args.dtype)
    model.to(device)
    # A pruned input stays sparse (keep_sparsity): the card must name the prune(s) that shaped these weights too.
    record = getattr(model.config, "hf_compress", None) or {}
    pruned_before = [*record.get("earlier_pruning", []), *([record["pruning"]] if record.get("pruning") else [])]
    check_not_packed(model, f"pass the float model to `quantize {args.method}` instead")  # before any training
    check_skip_patterns(model, args.skip)  # a typo would quantize the layers meant to be kept
    if args.skip:  # PEFT matches module names its own way: name the skipped layers as RTN's matcher finds them
        config.exclude_modules = skipped_layer_names(model, args.skip)
    if args.method == "dlqat":
        check_within_learned_positions(model, args.seq_len, "--seq-len is", "--seq-len")  # before training starts
    if args.method == "dlqat":
        with _compat.third_party_warnings_silenced():
            model = get_peft_model(model, config)
        trainable, total = model.get_nb_trainable_parameters()
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
        data = causal_lm_dataset(text, tokenizer, num_sequences=args.steps * args.batch_size, seq_len=args.seq_len)
        with tempfile.TemporaryDirectory() as scratch:
            train_with_trainer(model, data, scratch, settings)
        if not is_main_process():  # under torchrun every process trained alike; rank 0 writes
            return 0
    # Cards and adapter configs name the base model by its Hub id, never by a local path (None without one).
    base_model = base_model_of(model.config)
    base_weights = base_weights_of(model.config)  # a reference model's GGUF origin, which both cards state
    fields = _RECIPE_FIELDS if args.method == "dlqat" else ("bits", "group_size", "symmetric", "keep_sparsity")
    recipe = {"method": args.method, **{k: v for k, v in config.to_dict().items() if k in fields}}
    if args.skip:
        recipe["skip"] = list(args.skip)
    if pruned_before:
        recipe["pruned_before"] = pruned_before
    if args.method == "dlqat":
        recipe["training"] = {"steps": args.steps, "learning_rate": args.learning_rate,
                              "batch_size": args.batch_size, "seq_len": args.seq_len,
                              "data": calibration_text_record(args.calibration_text)}
        if args.adapter_dir:
            # peft records the base model's name_or_path (a local folder here, maybe): record the Hub id or none. A
            # pruned base is not the Hub model (the adapter refuses that one's weights): none, and the card says to
            # load the pruned model it was trained on.
            adapter_base = None if pruned_before else base_model
            for adapter_config in model.peft_config.values():
                adapter_config.base_model_name_or_path = adapter_base
            model.get_base_model().name_or_path = adapter_base
            trained_on = os.path.basename(os.path.normpath(args.model)) if pruned_before else None
            with atomic_directory(args.adapter_dir, overwrite=args.overwrite) as folder:
                # The embeddings are never resized: "auto" would only ask the Hub for the base config (a warning
                # offline, even with -q).
                model.save_pretrained(folder, save_embedding_layers=False)
                write_model_card(folder, _model_card(base_model, recipe, "adapter", args.adapter_dir,
                                                         base_weights, trained_on=trained_on))
    # rtn packs in place, recording "rtn" in config.json (an untrained DL-QAT export would record "dlqat").
    packed = model.merge_and_quantize() if args.method == "dlqat" else quantize_rtn(
        model, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, keep_sparsity=config.keep_sparsity,
        skip=args.skip)
    save_packed(packed, tokenizer, args.save_dir, overwrite=args.overwrite,
                card=_model_card(base_model, recipe, "compressed_model", args.save_dir, base_weights))
    size = packed_size(packed)
    # The whole checkpoint too: embeddings and norms stay float (Gemma-3's 262k-token table outweighs its layers).
    checkpoint_mb = disk_bytes(args.save_dir, "*.safetensors") / 1e6
    print(f"{args.method} {args.bits}-bit (group {args.group_size}): {size['layers']} packed layers, "
          f"{size['packed'] / size['bf16']:.3f}x their bf16 bytes; checkpoint {checkpoint_mb:.1f} MB on disk "
          f"(embeddings and norms unpacked), saved to {args.save_dir}")
    return 0


def _check_method_flags(args: argparse.Namespace) -> None:
    """Refuse dlqat-only flags given with rtn (it would silently ignore them), then fill in their defaults."""

    def refusal(given: list[str]) -> str:
        one = len(given) == 1
        return (f"{', '.join(given)} {'applies' if one else 'apply'} to `quantize dlqat` only (rtn trains nothing): "
                f"drop {'it' if one else 'them'} or run `hf-compress quantize dlqat`.")

    refuse_unused_flags(args, _DLQAT_ONLY_DEFAULTS, args.method == "rtn", refusal)
    if args.no_magnitude and args.no_lora:  # nothing would be trainable: torch would fail inside Trainer
        raise ValueError("--no-magnitude and --no-lora together leave DL-QAT nothing to train; drop one of them "
                         "(or run `hf-compress quantize rtn` for round-to-nearest without training).")


_RECIPE_FIELDS = ("bits", "group_size", "symmetric", "r", "lora_alpha", "lora_space", "use_magnitude", "use_lora",
                  "keep_sparsity")


def _model_card(base_model: str, recipe: dict, template: str, folder: str, base_weights: dict | None = None,
                trained_on: str | None = None):
    """A model card with the recipe; it lists no metrics, since this command measures none. Its code loads the
    folder by its name (as from its parent folder, or as a Hub repo of that name once pushed), never by the card's
    title, which names no folder or repo. ``trained_on``: the folder name of the pruned model an adapter was trained
    on, which its code loads as the base (and the card names no Hub base: the adapter refuses its dense weights)."""
    from ..hub import build_model_card

    name = f"{str(base_model or 'model').rpartition('/')[2]}-{recipe['method']}-{recipe['bits']}bit"
    # Both artifacts need `import hf_compress` first: it registers the packed format with transformers
    # and the DLQAT adapter type with peft.
    if template == "compressed_model":
        snippet = ("import hf_compress  # registers the packed low-bit format with transformers\n"
                   "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                   'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
                   'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    else:
        snippet = ("import hf_compress  # registers the DLQAT adapter type with peft\n"
                   "from peft import PeftModel\n"
                   "from transformers import AutoModelForCausalLM\n\n"
                   + (f'base = AutoModelForCausalLM.from_pretrained("{trained_on}")  # the pruned model it was trained on\n'
                      if trained_on else 'base = AutoModelForCausalLM.from_pretrained("{base_model}")\n')
                   + 'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
                   "packed = model.merge_and_quantize()  # real low-bit weights")
    pruning_tags = [p["method"] for p in recipe.get("pruned_before", []) if isinstance(p.get("method"), str)]
    return build_model_card(
        base_model=None if trained_on else base_model, model_name=name, recipe=recipe, template=template,
        load_snippet=snippet,
        extra_tags=pruning_tags, base_model_relation="quantized" if template == "compressed_model" else None,
        repo_id=os.path.basename(os.path.normpath(folder)), base_weights=base_weights,
    )

