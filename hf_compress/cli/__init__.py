"""The ``hf-compress`` command line (also reachable as ``optimum-cli hf-compress``)."""

from .main import build_parser, main


__all__ = ["build_parser", "main"]
