"""``python -m hessopt ...``: the same as the ``hessopt`` console script."""
import sys

from .cli import main

sys.exit(main())
