"""``hf-compress route``: search a schedule, train the token router, save a routed model folder.

Calibration (schedule search) and router training both draw from ``--calibration-text`` (default: the Wikipedia
calibration split); the saved folder loads with ``AutoModelForCausalLM.from_pretrained`` after
``import hf_compress``. ``--static`` skips training and saves the static positional router with the searched
schedule.
"""

from __future__ import annotations

import argparse

from ..cli.main import (
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


def _sparsity(text: str) -> float:
    from ..pruning.config import parse_sparsity  # the pruners' reading of a ratio: 0.3 and 30% alike

    try:
        pattern = parse_sparsity(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) such as 0.3 or 30%, got {text!r}") from None
    if pattern.is_n_m:
        raise argparse.ArgumentTypeError(f"is the fraction of tokens a block skips (e.g. 0.3 or 30%), not an N:M "
                                         f"weight pattern, got {text!r}")
    return pattern.ratio


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="reference name, tiny-<arch>, folder or Hub id (default: smollm2-135m)")
    parser.add_argument("--sparsity", type=_sparsity, default=0.3,
                        help="mean fraction of tokens a block skips: 0.3 or 30%% (default 0.3)")
    parser.add_argument("--generations", type=int_at_least(0), default=8,
                        help="schedule search generations (default 8)")
    parser.add_argument("--population", type=int_at_least(2), default=12,
                        help="schedule search population (default 12)")
    parser.add_argument("--search-windows", type=int_at_least(1), default=4,
                        help="calibration windows per score (default 4)")
    parser.add_argument("--seq-len", type=int_at_least(2), default=256, help="tokens per window (default 256)")
    # Training flags default to None so that one given with --static (which trains nothing) can be refused.
    parser.add_argument("--steps", type=int_at_least(1), default=None, help="router training steps (default 200)")
    parser.add_argument("--learning-rate", type=positive_float, default=None,
                        help="router AdamW learning rate (default 1e-3)")
    parser.add_argument("--static", action="store_true",
                        help="no training: save the static router (not with --steps / --learning-rate)")
    parser.add_argument("--save-dir", required=True, help="folder for the routed model")
    calibration_text_argument(parser, help_prefix="schedule search and router training text: ")
    device_argument(parser)  # the schedule search and the router training run there
    dtype_argument(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="save into a non-empty --save-dir: its model is replaced, other files are kept")


@command("route", "token router (FTP): tokens skip the blocks they don't need", _arguments)
def run_route(args: argparse.Namespace) -> int:
    from ..assets import load_calibration_text, load_model
    from ..hub import hub_model_id
    from ..modeling.layers import check_within_learned_positions
    from ..training import TrainingSettings, causal_lm_dataset, is_main_process
    from ..utils import check_save_dir
    from . import TokenRouterConfig, save_routed, search_schedule, static_router, train_token_router

    _check_training_flags(args)
    check_save_dir(args.save_dir, args.overwrite, argument="--save-dir")
    device = resolve_device(args.device)  # checked before the model loads
    if args.static:  # trains nothing, so any GPU will do; under torchrun a CPU run shares its schedule over a CPU group
        settings = TrainingSettings(device="cpu") if device.type == "cpu" else None
    else:  # Trainer places the model itself: the settings' device keeps training where --device says (checked now)
        settings = TrainingSettings(max_steps=args.steps, learning_rate=args.learning_rate, per_device_batch_size=1,
                                    logging_steps=max(1, args.steps // 10), progress=not args.quiet, device=device)
    text = load_calibration_text(args.calibration_text)  # a bad text file is reported before the model loads too
    config = TokenRouterConfig(
        token_sparsity=args.sparsity, generations=args.generations, population=args.population,
        search_windows=args.search_windows, search_seq_len=args.seq_len,
    )
    model, tokenizer = load_model(args.model, args.dtype)
    _check_stacking(args.model, model)  # before the search's work, as a recipe's route step is checked
    model.to(device)
    check_within_learned_positions(model, args.seq_len, "--seq-len is", "--seq-len")  # before the search's work
    schedule = search_schedule(model, text, config, tokenizer=tokenizer, progress=not args.quiet, args=settings)
    print("schedule:", " ".join(f"{r:.2f}" for r in schedule.block_sparsity))
    if args.static:
        static_router(model, schedule)
    else:
        data = causal_lm_dataset(text, tokenizer, num_sequences=args.steps, seq_len=args.seq_len, seed=config.seed + 1)
        train_token_router(model, schedule, data, args=settings, config=config)
    if not is_main_process():  # under torchrun every process trained alike; rank 0 writes
        return 0
    recipe = {"token_sparsity": args.sparsity, "config": config.to_dict(),
              "data": calibration_text_record(args.calibration_text)}
    target = save_routed(model, tokenizer, args.save_dir, overwrite=args.overwrite, recipe=recipe,
                         base_model=hub_model_id(getattr(model.config, "name_or_path", None)))
    print(f"saved the routed model to {target}")
    return 0


_TRAINING_DEFAULTS = {"steps": 200, "learning_rate": 1e-3}


def _check_stacking(name: str, model) -> None:
    """Refuse a mask-pruned, slim or packed model as a recipe refuses a route step after one: the routed format
    would store a pruned model's weights dense, without its pruning on the card."""
    from ..recipe.steps.base import ROUTE_STACKING, model_facts

    facts = model_facts(model)
    for fact, reason in ROUTE_STACKING.items():
        if fact in facts:
            raise ValueError(f"--model {name} is {facts[fact]}: {reason}")


def _check_training_flags(args: argparse.Namespace) -> None:
    """Refuse training flags given with ``--static`` (it would silently ignore them), then fill in their defaults."""

    def refusal(given: list[str]) -> str:
        one = len(given) == 1
        return (f"{' and '.join(given)} {'sets' if one else 'set'} router training, which --static skips: "
                f"drop {'it' if one else 'them'} or drop --static.")

    refuse_unused_flags(args, _TRAINING_DEFAULTS, args.static, refusal)
