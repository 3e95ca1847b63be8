"""The image-classification recipe: ``train.py``, its checkpoint format (``checkpoint.py``) and ``analyze.py``."""
