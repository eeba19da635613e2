"""TRELLIS.2 backend: the model re-implementation, the asset builder and the ZeroMQ job server."""

__version__ = "0.1.0"
