"""linearize: distil a Llama-architecture Transformer into subquadratic students."""

__version__ = "0.1.0"

# Registers the student config/model with transformers' Auto classes, so that
# AutoModelForCausalLM.from_pretrained(<saved student>) works after `import linearize`.
from . import modeling as _modeling  # noqa: E402,F401
