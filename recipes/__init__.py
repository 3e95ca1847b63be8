"""Training recipes, their models and data (``recipes.common``): beside the ``hessopt`` package, not in it.

Importable as ``recipes.*`` with the repository root on ``sys.path`` (run scripts from the root, or
let them insert it, as they do); the wheel ships only ``hessopt``.
"""
