"""``hf-compress recipe run|check recipe.yaml``: run a recipe into a folder, or only check it.

``check`` runs every check that needs no model (keys, fields, methods, the order of the steps) and lists the
steps; ``run`` also checks ``--save-dir`` before loading anything, then runs the steps and saves the folder.
"""

from __future__ import annotations

import argparse

from ..cli.main import command, common_flags, device_argument


def _arguments(parser: argparse.ArgumentParser) -> None:
    common = common_flags()
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="check a recipe (fields, methods, step order) without running it",
                               description="check a recipe (fields, methods, step order) without running it",
                               parents=[common])
    check.add_argument("recipe", help="the recipe YAML file")
    run = actions.add_parser("run", help="run a recipe and save the final model folder",
                             description="run a recipe and save the final model folder", parents=[common])
    run.add_argument("recipe", help="the recipe YAML file")
    run.add_argument("--save-dir", required=True, help="folder for the final model, recipe.yaml and its card")
    run.add_argument("--overwrite", action="store_true",
                     help="save into a non-empty --save-dir: its model is replaced, other files are kept")
    run.add_argument("--repo-id", metavar="OWNER/NAME",
                     help="the Hub repo the folder will be pushed to, named by the card's loading snippet "
                          "(default: the snippet loads the folder from disk)")
    device_argument(run)


@command("recipe", "run several methods as one measured, reproducible recipe (hf-compress recipe run|check)",
         _arguments)
def run_recipe(args: argparse.Namespace) -> int:
    from ..utils import check_save_dir
    from .runner import check_not_base_folder, check_repo_id, load_recipe, run

    recipe = load_recipe(args.recipe)
    if args.action == "check":
        print(f"{args.recipe}: recipe {recipe.name!r} on {recipe.base_model}, seed {recipe.seed}: ok")
        for line in recipe.check():
            print(f"  {line}")
        return 0
    check_save_dir(args.save_dir, args.overwrite, argument="--save-dir")  # the messages name the flag, not save_dir
    check_not_base_folder(recipe, args.save_dir, argument="--save-dir")
    check_repo_id(args.repo_id, argument="--repo-id")
    result = run(recipe, args.save_dir, device=args.device, overwrite=args.overwrite, progress=not args.quiet,
                 repo_id=args.repo_id)
    for record in result.records:
        metrics = record.metrics
        print(f"{record.index}. {record.name}: perplexity {metrics['perplexity']:.4f}, "
              f"{metrics['stored_bytes'] / 1e6:.2f} MB stored, decoder linears "
              f"{metrics['decoder_linear_vs_base_fp32']:.3f}x the base's fp32 ({record.seconds:.1f} s)")
    if "folder_disk_bytes" in result.final_metrics:  # not on the other ranks under torchrun: rank 0 writes
        print(f"saved to {result.save_dir} ({result.final_metrics['folder_disk_bytes'] / 1e6:.2f} MB on disk)")
    return 0
