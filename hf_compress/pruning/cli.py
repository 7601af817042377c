"""``hf-compress prune METHOD``: every registered pruner, with flags generated from its config.

The methods come from the registry (``registry.CONFIGS``, one line each from the config's docstring) and the
named method's flags from its config dataclass (``cli.config_flags``) and pruner (``registry.PRUNERS``), so a new
method folder appears here with all its settings and nothing in this file changes. Run options that are not config
fields come from the pruner (``add_cli_arguments`` / ``prune_kwargs_from_cli``, e.g. Týr's ``--work-dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from ..cli.main import (DEFAULT_CALIBRATION_TEXT, calibration_text_argument, calibration_text_record, command,
                        common_flags, device_argument, dtype_argument, named_command, resolve_device)


def _arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> None:
    """Every method is listed from its config; only the one ``argv`` names (all when ``argv`` is None) gets its
    flags, which need its pruner class, and so torch: ``hf-compress prune --help`` imports neither."""
    from ..cli.config_flags import add_config_arguments
    from .registry import CONFIGS, PRUNERS

    common = common_flags()
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    named = named_command(argv)  # the method
    for method, config_class in CONFIGS.items():
        builds = named is None or method == named
        try:
            pruner_class = PRUNERS[method] if builds else None
        except KeyError as error:  # a config registered without a pruner: left out, or refused when named
            if named is None:
                continue
            parser.error(error.args[0])
        summary = method_summary(config_class)
        child = methods.add_parser(method, help=summary, description=summary, parents=[common])
        if pruner_class is None:
            continue
        child.add_argument("--model", default="smollm2-135m",
                           help="reference name, tiny-<arch>, folder or Hub id (default: smollm2-135m)")
        child.add_argument("--save-dir", required=True, help="folder for the pruned checkpoint")
        child.add_argument("--overwrite", action="store_true",
                           help="save into a non-empty --save-dir: its model is replaced, other files are kept")
        calibration_text_argument(child, default=None, help_suffix="" if pruner_class.requires_calibration
                                  else f"; {method} reads it only with --permutation learned")
        child.add_argument("--options", f"--{method.replace('_', '-')}-options", dest="options", default=None,
                           metavar="JSON", help="more config fields as a JSON object, e.g. '{\"batch_size\": 4}' "
                                                "(a flag given for the same field wins)")
        device_argument(child)
        dtype_argument(child)
        add_config_arguments(child, pruner_class.config_class, defaults=pruner_class.cli_defaults)
        pruner_class.add_cli_arguments(child)
        child.set_defaults(pruner_class=pruner_class)


@command("prune", "prune a model with any registered method and save it (hf-compress prune METHOD --help)", _arguments)
def run_prune(args: argparse.Namespace) -> int:
    from ..assets import load_calibration_text
    from ..cli.config_flags import config_kwargs
    from ..utils import check_save_dir, is_main_process
    from .config import CALIBRATION_FIELDS
    from .permutation import LearnedPermutationConfig

    pruner_class = args.pruner_class
    check_save_dir(args.save_dir, args.overwrite, argument="--save-dir")  # the messages name the flag, not save_dir
    fields = {**pruner_class.cli_defaults, **_options(args.options), **config_kwargs(args)}
    known = {field.name for field in dataclasses.fields(pruner_class.config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"--options sets unknown {pruner_class.config_class.__name__} fields {unknown}; known: {sorted(known)}."
        )
    config = pruner_class.config_class(**fields)
    # Everything the user typed is checked before the (possibly slow) model load.
    trains = isinstance(getattr(config, "permutation", None), LearnedPermutationConfig)  # trains on the text
    reads_text = pruner_class.requires_calibration or trains
    if not reads_text:  # flags it would silently ignore, as quantize rtn refuses its training flags
        given = ["--calibration-text"] * (args.calibration_text is not None) + [
            f"--{name.replace('_', '-')}" for name in CALIBRATION_FIELDS if name in config_kwargs(args)]
        if given:
            one = len(given) == 1
            raise ValueError(f"{', '.join(given)} {'applies' if one else 'apply'} to methods that read calibration "
                             f"text; {pruner_class.config_class.method} reads none (unless with --permutation "
                             f"learned): drop {'it' if one else 'them'}.")
    args.calibration_text = args.calibration_text or DEFAULT_CALIBRATION_TEXT
    calibration = load_calibration_text(args.calibration_text) if reads_text else None
    device = resolve_device(args.device)
    pruner = pruner_class.from_pretrained(args.model, dtype=args.dtype)
    pruner.model.to(device)
    if calibration is not None:  # recorded with the recipe: a news-calibrated model says so
        pruner.calibration_data = calibration_text_record(args.calibration_text)
    pruner.prune(config, calibration, save_dir=args.save_dir, overwrite=args.overwrite, progress=not args.quiet,
                 **pruner_class.prune_kwargs_from_cli(args))
    if is_main_process():  # under torchrun every rank prunes, rank 0 writes
        print(f"{pruner.report.summary()}, saved to {args.save_dir}")
    return 0


def method_summary(config_class: type) -> str:
    """The first paragraph of a method's config docstring, on one line and without reST markup.

    Example:
        >>> from hf_compress.pruning.magnitude.config import MagnitudeConfig
        >>> method_summary(MagnitudeConfig)
        'Magnitude pruning: score |W|; an unstructured ratio is applied per layer (whole matrix).'
    """
    paragraph = (config_class.__doc__ or config_class.method).strip().split("\n\n")[0]
    return " ".join(paragraph.split()).replace("``", "")


def _options(text: str | None) -> dict:
    """The ``--options`` JSON object (``{}`` when not given), with a one-line error naming the flag."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--options must be a JSON object such as '{{\"batch_size\": 4}}': {err}.") from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object such as '{{\"batch_size\": 4}}', got {text!r}.")
    return options
