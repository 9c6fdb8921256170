"""`python -m peft_elastic.cli ...` is `peft-elastic ...`."""

import sys

from . import main

sys.exit(main())
