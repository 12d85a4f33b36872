"""md-meta: optimization-based meta-learning with learned loss geometries, in JAX."""
__version__ = '0.1.0'
