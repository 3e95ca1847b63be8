"""One progress-bar helper: a tqdm bar that is a silent no-op unless asked for."""
from tqdm.auto import tqdm


def progress_bar(total, enabled: bool, desc: str) -> tqdm:
    """A tqdm bar over ``total`` steps, disabled (no output, negligible cost) unless ``enabled``."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
