"""Spectrum of a symmetric operator: the Lanczos kernel, top eigenpairs, and the spectral density.

One kernel (:func:`lanczos`, with full reorthogonalization in a preallocated basis, vectors
accumulated in float32 or better whatever the operator's dtype, and a float64 tridiagonal) serves both
:func:`top_eigenvalues` (Ritz pairs with residual-based convergence) and :func:`spectral_density`
(stochastic Lanczos quadrature).
"""
from .density import spectral_density
from .eigen import top_eigenvalues
from .lanczos import lanczos

__all__ = ["lanczos", "top_eigenvalues", "spectral_density"]
