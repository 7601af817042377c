"""``hf-compress prune METHOD``: one-shot pruning from the command line."""

from __future__ import annotations

import argparse

from ..cli.main import command


_METHODS = ("magnitude", "wanda", "sparsegpt", "sds", "tyr", "block_removal")
_STRUCTURAL = ("tyr", "block_removal")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=_METHODS, help="pruning method")
    parser.add_argument("--model", default="smollm2-135m", help="reference name, tiny-<arch>, folder or Hub id")
    parser.add_argument("--sparsity", default=None,
                        help="a ratio (0.5, 50%%) or N:M (2:4, 4:8); default 2:4. tyr / block_removal: the fraction "
                             "of decoder parameters to remove (default 0.3)")
    parser.add_argument("--save-dir", required=True, help="folder for the pruned, sparse-stored checkpoint")
    parser.add_argument("--calibration-sequences", type=int, default=None,
                        help="calibration windows (default 128; tyr / block_removal: 64)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 512; "
                        "tyr / block_removal: 256)")
    parser.add_argument("--skip", action="append", default=[], help="fnmatch pattern of layers to keep dense")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --save-dir")
    parser.add_argument("--base", choices=("wanda", "sparsegpt", "magnitude"), default="sparsegpt",
                        help="sds only: the one-shot pruner SDS wraps (default sparsegpt)")
    parser.add_argument("--redense-epochs", type=int, default=None, help="sds only: re-dense epochs (default 2)")
    parser.add_argument("--allocation", choices=("search", "uniform"), default="search",
                        help="tyr only: search the per-layer allocation (default) or prune every layer alike")
    parser.add_argument("--tyr-options", default=None,
                        help='tyr only: JSON of more TyrConfig fields, e.g. \'{"num_iterations": 2, "generations": 10}\'')
    parser.add_argument("--work-dir", default=None,
                        help="tyr only: keep the supernet and search state here; rerun with it to resume")


@command("prune", "prune a model (magnitude, Wanda, SparseGPT, SDS; Týr, block removal) and save it", _arguments)
def run_prune(args: argparse.Namespace) -> int:
    from ..assets import load_text
    from . import PRUNERS

    if args.method in _STRUCTURAL:
        return _run_structural(args)
    args.sparsity = args.sparsity or "2:4"
    args.calibration_sequences = args.calibration_sequences or 128
    args.seq_len = args.seq_len or 512
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


def _run_structural(args: argparse.Namespace) -> int:
    import json

    from ..assets import load_text
    from . import PRUNERS
    from .config import parse_sparsity

    pattern = parse_sparsity(args.sparsity or "0.3")
    if pattern.is_n_m:
        raise ValueError(f"{args.method} removes a fraction of the decoder parameters; pass a ratio, not {pattern}.")
    fields = {"target_sparsity": pattern.ratio, "skip": args.skip,
              "num_calibration_sequences": args.calibration_sequences or 64, "calibration_seq_len": args.seq_len or 256}
    options = {}
    if args.method == "tyr":
        fields.update({"allocation": args.allocation, **json.loads(args.tyr_options or "{}")})
        options["work_dir"] = args.work_dir
    pruner_cls = PRUNERS[args.method]
    config = pruner_cls.config_class(**fields)
    pruner = pruner_cls.from_pretrained(args.model)
    pruner.prune(config, load_text("wikipedia", "calibration"), save_dir=args.save_dir, overwrite=args.overwrite,
                 progress=not args.quiet, **options)
    report = pruner.report
    print(f"{args.method} {pattern.ratio:g}: removed {report.achieved_sparsity:.4f} of decoder parameters "
          f"({report.dense_parameters} -> {report.pruned_parameters}), saved to {args.save_dir}")
    return 0
