"""zhlm: a small Chinese chat model, from raw corpus to aligned model."""

__version__ = "0.1.0"
