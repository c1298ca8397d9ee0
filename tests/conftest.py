import os
from pathlib import Path

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


STAGE_SEQ = 16  # the block length of the stage tests' tiny runs


@pytest.fixture(scope="module")
def stage_teacher():
    """The tiny random Llama (fp32) the stage, transfer and hardening tests train students of
    (module scope: each test module gets its own, as it always did)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def stage_blocks():
    """24 random training blocks of STAGE_SEQ tokens for stage_teacher's vocabulary."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (24, STAGE_SEQ), generator=g)


# tests/fla_interpret runs FLA's Triton kernels under Triton's interpreter, which must be switched
# on (TRITON_INTERPRET=1) before triton is imported: it gets a pytest process of its own,
# `pytest --fla-interpret` (make test-fla), and every other run leaves it out.
FLA_INTERPRET_DIR = Path(__file__).parent / "fla_interpret"


def pytest_addoption(parser):
    parser.addoption("--fla-interpret", action="store_true", default=False,
                     help="run only tests/fla_interpret: FLA's Triton kernels under Triton's CPU interpreter")


def pytest_ignore_collect(collection_path, config):
    path = Path(collection_path)
    inside = path == FLA_INTERPRET_DIR or FLA_INTERPRET_DIR in path.parents
    if config.getoption("--fla-interpret"):
        # only the interpreter tests, and the folders above them
        return None if inside or path in FLA_INTERPRET_DIR.parents else True
    return True if inside else None
