"""hunyuan-service: one generative model on one GPU behind an HTTP API."""

__version__ = "0.1.0"
