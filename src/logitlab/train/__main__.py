"""``python -m logitlab.train ...`` and ``torchrun --nproc-per-node K -m logitlab.train ...``."""

import sys

from .cli import main

sys.exit(main())
