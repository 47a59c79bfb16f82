import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


@pytest.fixture
def tiny_qwen():
    """A random 2-layer Qwen2 with GQA, float32, vocab 50."""
    def make(dtype=torch.float32, seed=0, vocab=50, tie=True):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=tie)
        return Qwen2ForCausalLM(cfg).to(dtype)
    return make


def pytest_terminal_summary(terminalreporter):
    """`pytest -m reliability` ends with the tally issue 13 asks for: cases tried and handled."""
    reports = [r for k in ("passed", "failed", "error") for r in terminalreporter.stats.get(k, [])
               if r.when == "call" and "reliability" in r.keywords]
    if reports:
        terminalreporter.write_line(f"reliability: {sum(r.passed for r in reports)} of {len(reports)} cases handled")
