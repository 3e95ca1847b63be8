"""Packaging for hessopt: an AdaHessian optimizer and Hessian diagnostics for PyTorch."""
import os

from setuptools import find_packages, setup

# fairseq 0.12.2 (the last release) cannot be imported on Python >= 3.11 (a dataclass with a mutable
# default); the maintained fork `fairseq-fixed` ships the same `import fairseq` and works there. The
# choice is an environment marker, evaluated where the package is installed, so a wheel built on one
# Python version installs the right fairseq on another.
FAIRSEQ = ['fairseq-fixed==0.12.3.1; python_version >= "3.11"', 'fairseq==0.12.2; python_version < "3.11"']
# hessopt.integrations.timm registers in timm's private optimizer registry: tested with timm 1.0.12
# (the first release with that registry) and 1.0.31 (see TESTED_TIMM_RANGE there); 1.1 may move it.
TIMM = "timm>=1.0.12,<1.1"
PLOT = ["matplotlib>=3.7"]
# the recipes and `make demo`: scikit-learn's digits are the default data set (no download)
RECIPES = ["scikit-learn>=1.2", "numpy>=1.23"] + PLOT

setup(
    name="hessopt",
    version="0.1.0",
    description="AdaHessian-style second-order optimizer and Hessian diagnostics for PyTorch",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    author="the hessopt authors",
    python_requires=">=3.9",
    packages=find_packages(include=["hessopt", "hessopt.*"]),
    # numpy only behind optional paths (plots: matplotlib; op.to_scipy(): scipy), which bring it
    install_requires=["torch>=2.1", "tqdm>=4.60"],
    extras_require={
        "timm": [TIMM, "torchvision"],
        "fairseq": FAIRSEQ + ["sentencepiece>=0.1.99", "sacrebleu>=2.0"],
        "plot": PLOT,
        "tensorboard": ["tensorboard>=2.10"],
        "recipes": RECIPES,
        "dev": ["pytest>=7", "pytest-timeout>=2.1", "tensorboard>=2.10"] + RECIPES,
    },
    entry_points={"console_scripts": ["hessopt=hessopt.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
