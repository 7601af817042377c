"""Registers ``optimum-cli hf-compress …`` (optimum discovers modules in this PEP 420 namespace).

Every argument after ``hf-compress`` goes to the ``hf-compress`` command line unchanged, ``--help`` included, so
``optimum-cli hf-compress --help`` lists the real sub-commands and ``optimum-cli hf-compress prune wanda --help``
the flags of that method. Kept import-light: optimum imports every register module at start-up.
"""

import argparse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class _PassHelpThrough(argparse.Action):
    """``-h``/``--help`` right after ``hf-compress``: remembered and handed to hf-compress, not answered here."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=[], help="show hf-compress's help (its sub-commands)")

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest, []), option_string])


class HfCompressCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="hf-compress", help="hf_compress: compress, evaluate and publish LLMs (optimum-cli hf-compress --help lists the commands)")

    @staticmethod
    def parse_args(parser):
        # optimum built this parser with its own -h; a group created with conflict_handler "resolve" lets ours
        # replace it (argument groups take the parser's handler when they are created).
        parser.conflict_handler = "resolve"
        passed_through = parser.add_argument_group("hf-compress")
        passed_through.add_argument("-h", "--help", dest="hf_compress_help", action=_PassHelpThrough)
        passed_through.add_argument("hf_compress_args", nargs="...", help="arguments for hf-compress")

    def run(self):
        from hf_compress.cli.main import main

        raise SystemExit(main([*self.args.hf_compress_help, *self.args.hf_compress_args]))


REGISTER_COMMANDS = [HfCompressCommand]
