"""analogjax: distill a large JAX model into a small, faithful analog."""

__version__ = "0.1.0"
