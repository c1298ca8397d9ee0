import os

# Keep the suite offline and well-behaved on 2 shared cores (see docs/environment.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def teacher():
    """The embedded SmolLM2-135M-Instruct teacher (fp32, cached safetensors: ~0.4 s)."""
    from linearize.teacher import load_teacher

    return load_teacher()


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random Llama (float64) for tests that need a teacher's shape, not its knowledge."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).double().eval()
