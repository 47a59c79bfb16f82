import pytest
import torch


@pytest.fixture
def move_adapter():
    """`move(model)`: push every LoRA B matrix by 0.3 x noise, so a served-merged adapter
    visibly changes what the model says (the vLLM LoRA tests, text and video)."""
    def move(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.3 * torch.randn_like(p))
    return move
