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
