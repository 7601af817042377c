"""``hf-compress prune METHOD``: one-shot pruning from the command line."""

from __future__ import annotations

import argparse

from ..cli.main import command


_METHODS = ("magnitude", "wanda", "sparsegpt", "sds")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=_METHODS, help="pruning method")
    parser.add_argument("--model", default="smollm2-135m", help="reference name, tiny-<arch>, folder or Hub id")
    parser.add_argument("--sparsity", default="2:4", help="a ratio (0.5, 50%%) or N:M (2:4, 4:8); default 2:4")
    parser.add_argument("--save-dir", required=True, help="folder for the pruned, sparse-stored checkpoint")
    parser.add_argument("--calibration-sequences", type=int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--skip", action="append", default=[], help="fnmatch pattern of layers to keep dense")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --save-dir")
    parser.add_argument("--base", choices=("wanda", "sparsegpt", "magnitude"), default="sparsegpt",
                        help="sds only: the one-shot pruner SDS wraps (default sparsegpt)")
    parser.add_argument("--redense-epochs", type=int, default=None, help="sds only: re-dense epochs (default 2)")


@command("prune", "prune a model (magnitude, Wanda, SparseGPT, SDS) and save it sparse", _arguments)
def run_prune(args: argparse.Namespace) -> int:
    from ..assets import load_text
    from . import PRUNERS

    pruner_cls = PRUNERS[args.method]
    options = {}
    if args.method == "sds":
        options["base"] = args.base
        if args.redense_epochs is not None:
            options["redense_epochs"] = args.redense_epochs
    config = pruner_cls.config_class(
        sparsity=args.sparsity, skip=args.skip, num_calibration_sequences=args.calibration_sequences,
        calibration_seq_len=args.seq_len, **options,
    )
    pruner = pruner_cls.from_pretrained(args.model)
    calibration = load_text("wikipedia", "calibration") if args.method != "magnitude" else None
    pruner.prune(config, calibration, save_dir=args.save_dir, overwrite=args.overwrite, progress=not args.quiet)
    print(f"{args.method} {config.sparsity}: overall sparsity {pruner.report.overall_sparsity:.4f}, "
          f"saved to {args.save_dir}")
    return 0
