"""``hf-compress publish``: push a built artifact set (its ``manifest.json``) to the Hub.

Every artifact is verified first (files against their sha256 and size, cards against huggingface_hub's parser
and the manifest's measurements, ``--namespace`` against the one the cards were built for); then each artifact
whose repo does not already hold exactly these files is uploaded. ``--dry-run`` runs the checks and prints the
plan without contacting the Hub.
"""

from __future__ import annotations

import argparse

from ..cli.main import command


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="the set's manifest.json (scripts/build_artifacts.py writes it)")
    # Required: publish() refuses a missing namespace even for --dry-run (the plan is namespace/<name>), so argparse
    # says so with the usage line, and --help marks it required, instead of a run-time error after parsing.
    parser.add_argument("--namespace", required=True,
                        help="Hub user or organisation the repos go to (required); it must be the one the set "
                             "was built for (build_artifacts.py --namespace), whose repo ids the cards name")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None, help="publish only these artifacts")
    parser.add_argument("--private", action="store_true", help="create new repos as private")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the plan; send nothing")


@command("publish", "verify a built artifact set (manifest.json) and push it to the Hub", _arguments)
def run_publish(args: argparse.Namespace) -> int:
    from .publish import publish

    results = publish(args.manifest, args.namespace, names=args.only, private=True if args.private else None,
                      dry_run=args.dry_run)
    for result in results:
        detail = f"{len(result.changed)} file(s)" if result.changed else "nothing sent"
        print(f"{result.status:<9} {result.repo_id} ({detail})" + (f" {result.commit_url}" if result.commit_url else ""))
    return 0
