"""Registers ``optimum-cli hf-compress …`` (optimum discovers modules in this PEP 420 namespace).

Kept import-light: optimum imports every register module at start-up.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class HfCompressCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="hf-compress", help="hf_compress: prune, quantize, evaluate LLMs and run the demo (hf-compress --help lists the commands)")

    @staticmethod
    def parse_args(parser):
        parser.add_argument("hf_compress_args", nargs="...", help="arguments for hf-compress (see hf-compress --help)")

    def run(self):
        from hf_compress.cli.main import main

        raise SystemExit(main(self.args.hf_compress_args))


REGISTER_COMMANDS = [HfCompressCommand]
