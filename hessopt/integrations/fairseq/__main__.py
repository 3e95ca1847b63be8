"""``python -m hessopt.integrations.fairseq``: print the folder to pass to ``fairseq-train --user-dir``."""
from . import USER_DIR

print(USER_DIR)
