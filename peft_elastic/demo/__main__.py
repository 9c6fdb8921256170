"""`python -m peft_elastic.demo ...` is `peft-elastic demo ...`."""

import sys

from ..cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
