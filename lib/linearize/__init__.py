"""linearize: distil a Llama-architecture Transformer into subquadratic students."""

__version__ = "0.1.0"
