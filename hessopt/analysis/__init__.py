"""Hessian analyses on top of the operator/estimator core (one concept per module).

=====================  ===========================================================================
module                 what
=====================  ===========================================================================
``layerwise``          per-block (layer) top eigenvalues, trace, density: :func:`layerwise`
``concentration``      fraction of the gradient in the top eigenspace: :func:`gradient_concentration`
``overlap``            subspace overlap, layer-wise across models: :func:`eigenspace_overlap`,
                       :func:`layerwise_overlap`
``kronecker``          ``E[M] (x) E[xx^T]`` approximation of a layer Hessian: :func:`kronecker_factors`
``lowrank``            rank structure of reshaped eigenvectors: :func:`low_rank_structure`,
                       :func:`eigenvector_structures`
``landscape``          loss along eigen/random directions: :func:`loss_landscape`,
                       :func:`random_directions`
``sensitivity``        per-layer / per-channel Hessian-trace sensitivity (HAWQ-V2) and quantization
                       scores: :func:`hessian_sensitivity`, :func:`quantize`
``plots``              matplotlib figures (lazy import; ``pip install hessopt[plot]``)
=====================  ===========================================================================
"""
from .concentration import GradientConcentration, gradient_concentration
from .kronecker import KroneckerFactors, kronecker_factors
from .landscape import Landscape, loss_landscape, random_directions
from .layerwise import LayerSpectrum, LayerwiseSpectrum, layerwise, resolve_blocks
from .lowrank import LowRankStructure, eigenvector_structures, low_rank_structure
from .overlap import LayerwiseOverlap, eigenspace_overlap, layerwise_overlap
from .sensitivity import (
    BlockQuantization,
    BlockSensitivity,
    HessianSensitivity,
    QuantizationSensitivity,
    hessian_sensitivity,
    quantization_error,
    quantize,
)
from .plots import plot_density, plot_eigenvalue_evolution, plot_landscape, plot_layerwise

__all__ = [
    "layerwise",
    "resolve_blocks",
    "LayerSpectrum",
    "LayerwiseSpectrum",
    "gradient_concentration",
    "GradientConcentration",
    "eigenspace_overlap",
    "layerwise_overlap",
    "LayerwiseOverlap",
    "kronecker_factors",
    "KroneckerFactors",
    "low_rank_structure",
    "eigenvector_structures",
    "LowRankStructure",
    "loss_landscape",
    "random_directions",
    "Landscape",
    "hessian_sensitivity",
    "HessianSensitivity",
    "BlockSensitivity",
    "quantize",
    "quantization_error",
    "QuantizationSensitivity",
    "BlockQuantization",
    "plot_density",
    "plot_eigenvalue_evolution",
    "plot_landscape",
    "plot_layerwise",
]
