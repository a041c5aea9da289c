"""`python -m tailoredgen_train ...`: the CLI, and what `accelerate launch -m tailoredgen_train` runs."""

import sys

from .cli import main

sys.exit(main())
