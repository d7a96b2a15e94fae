"""``python -m lmgen_fast.cli`` (and ``torchrun -m lmgen_fast.cli``): the command."""

import sys

from lmgen_fast.cli.main import main

sys.exit(main())
