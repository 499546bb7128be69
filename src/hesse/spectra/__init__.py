"""Spectra of symmetric operators: extreme eigenpairs, traces and spectral densities."""

from hesse.spectra._lanczos import EigshResult, eigsh
from hesse.spectra._slq import SpectralDensity, spectral_density
from hesse.spectra._trace import trace

__all__ = ["EigshResult", "SpectralDensity", "eigsh", "spectral_density", "trace"]
