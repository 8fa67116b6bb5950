"""`python -m trainer ...` (what `torchrun --nproc-per-node G -m trainer ...` runs) = `logitstore-train`."""

import sys

from trainer.cli import main

sys.exit(main())
