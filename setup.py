"""Packaging for hessopt: an AdaHessian optimizer and Hessian diagnostics for PyTorch."""
import sys

from setuptools import find_packages, setup

# fairseq 0.12.2 (the last release) cannot be imported on Python >= 3.11 (a dataclass with a mutable
# default); the maintained fork `fairseq-fixed` ships the same `import fairseq` and works there.
FAIRSEQ = "fairseq-fixed==0.12.3.1" if sys.version_info >= (3, 11) else "fairseq==0.12.2"
TIMM = "timm==1.0.29"  # the timm version hessopt.integrations.timm is tested against
PLOT = ["matplotlib>=3.7"]

setup(
    name="hessopt",
    version="0.1.0",
    description="AdaHessian-style second-order optimizer and Hessian diagnostics for PyTorch",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hessopt", "hessopt.*"]),
    install_requires=["torch>=2.1", "numpy>=1.23", "tqdm>=4.60"],
    extras_require={
        "timm": [TIMM, "torchvision"],
        "fairseq": [FAIRSEQ, "sentencepiece>=0.1.99", "sacrebleu>=2.0"],
        "plot": PLOT,
        "tensorboard": ["tensorboard>=2.10"],
        "dev": ["pytest>=7", "pytest-timeout>=2.1", "scikit-learn>=1.2", "tensorboard>=2.10"] + PLOT,
    },
    entry_points={"console_scripts": ["hessopt=hessopt.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
