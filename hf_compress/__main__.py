"""``python -m hf_compress`` is the ``hf-compress`` command."""

import sys

from .cli.main import main


sys.exit(main())
