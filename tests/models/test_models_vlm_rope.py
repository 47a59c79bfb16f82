"""vLLM's rotary numbering for video prompts (models/vlm_rope.py) and the request payload the
vLLM backend sends (rollout/vllm.py's engine_prompt): hand-worked positions, padding, the
switch on a model, and the check that refuses positions vLLM would not use."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from longrl.models import vlm_rope
from longrl.models.vlm import VideoEmbeds
from longrl.policy.video import VideoPrompt
from longrl.rollout.base import RolloutRequest
from longrl.rollout.vllm import engine_prompt

PAD = 99
CONFIG = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=2), video_token_id=PAD)


def test_hand_worked_positions_of_text_video_text():
    # Patch grid (2, 4, 4), merge 2 -> video tokens on a (t, h, w) = (2, 2, 2) grid; time at
    # 1 s per step x 2 tokens per second: 0, 2. Two text tokens before, two after.
    ids = torch.tensor([[1, 2] + [PAD] * 8 + [3, 4]])
    pos = vlm_rope.vllm_rope_index(CONFIG, ids, ids == PAD, torch.tensor([2, 4, 4]))
    assert pos[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 4, 4, 4, 4, 5, 6],  # time: video t*2 + 2; text after from max + 1 = 5
        [0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 5, 6],  # height
        [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 5, 6],  # width
    ]
    # The clip's real spacing, sent to vLLM as second_per_grid_ts: 2 s per step -> time 0, 4.
    slow = vlm_rope.vllm_rope_index(CONFIG, ids, ids == PAD, torch.tensor([2, 4, 4]), second_per_grid=2.0)
    assert slow[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 6, 6, 6, 6, 7, 8]
    assert torch.equal(slow[1:], pos[1:] + torch.tensor([0] * 10 + [2, 2]))  # text after moves with the time axis
    # 0.75 s x 2 tokens per second = 1.5 per step: floored, as vLLM's int64 cast of the product
    frac = vlm_rope.vllm_rope_index(CONFIG, torch.tensor([[PAD] * 12]), torch.tensor([[True] * 12]),
                                    torch.tensor([3, 4, 4]), second_per_grid=0.75)
    assert frac[0, 0, ::4].tolist() == [0, 1, 3]


def test_padded_columns_get_one_and_attended_ones_the_unpadded_numbering():
    ids = torch.tensor([[1, 2] + [PAD] * 8 + [3, 4]])
    grid = torch.tensor([2, 4, 4])
    plain = vlm_rope.vllm_rope_index(CONFIG, ids, ids == PAD, grid)[:, 0]
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)  # three left pads
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    pos = vlm_rope.vllm_rope_index(CONFIG, left, left == PAD, grid, attention_mask=mask)[:, 0]
    assert torch.equal(pos[:, 3:], plain) and bool((pos[:, :3] == 1).all())


def test_a_video_split_by_text_is_refused():
    ids = torch.tensor([[1] + [PAD] * 4 + [3] + [PAD] * 4])
    with pytest.raises(ValueError, match="contiguous"):
        vlm_rope.vllm_rope_index(CONFIG, ids, ids == PAD, torch.tensor([2, 4, 4]))


def test_the_numbering_switch_reaches_the_models_positions():
    from longrl.models.vlm import build_tiny_vlm, build_vlm_tokenizer, prompt_positions, video_prompt_ids

    tok = build_vlm_tokenizer()
    model = build_tiny_vlm(tok)
    # 4 temporal steps: transformers continues the text from the video's start plus a spatial
    # extent, vLLM from 1 + the largest (time) position, so the rules differ after the video
    video = VideoEmbeds(torch.zeros(16, model.config.text_config.hidden_size), torch.tensor([4, 4, 4]), 0.5)
    ids = video_prompt_ids(tok, video.n_tokens, "what colour?")
    hf = prompt_positions(model, ids, video)
    vlm_rope.set_numbering(model, "vllm")
    ours = prompt_positions(model, ids, video)
    t = torch.tensor([ids])
    assert torch.equal(ours, vlm_rope.vllm_rope_index(model.config, t, t == model.config.video_token_id,
                                                      video.grid_thw, second_per_grid=0.5)[:, 0])
    assert not torch.equal(ours, hf)  # the two rules differ after the video: the switch matters
    with pytest.raises(ValueError, match="numbering"):
        vlm_rope.set_numbering(model, "other")


def test_the_numbering_is_saved_with_the_model(tmp_path):
    """A checkpoint carries its numbering: evaluated later, the model numbers positions the
    way it was trained (through a LoRA wrapper too, which shares the config)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from longrl.models.vlm import build_tiny_vlm, build_vlm_tokenizer

    tok = build_vlm_tokenizer()
    model = build_tiny_vlm(tok)
    assert vlm_rope.numbering(model) == "transformers"
    vlm_rope.set_numbering(model, "vllm")
    model.save_pretrained(tmp_path / "m")
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert vlm_rope.numbering(loaded) == "vllm"
    assert vlm_rope.numbering(build_tiny_vlm(tok)) == "transformers"  # a fresh model: the default
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question (as models/lora.py notes)
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(build_tiny_vlm(tok), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    vlm_rope.set_numbering(wrapped, "vllm")
    assert vlm_rope.numbering(wrapped.get_base_model()) == "vllm"


def _request(positions_rule: str):
    ids = [1, 2] + [PAD] * 8 + [3, 4]
    video = VideoEmbeds(torch.randn(8, 16), torch.tensor([2, 4, 4]), 0.5)
    t = torch.tensor([ids])
    pos = vlm_rope.vllm_rope_index(CONFIG, t, t == PAD, video.grid_thw, second_per_grid=0.5)[:, 0]
    if positions_rule == "other":
        pos = pos.clone()
        pos[:, -2:] -= 3  # what the transformers rule would give: text after the video earlier
    return RolloutRequest(ids, 2, VideoPrompt(video, pos)), video


def test_engine_prompt_carries_the_cached_embeddings_and_grid():
    req, video = _request("vllm")
    p = engine_prompt(req, CONFIG)
    # One pad where the policy's prompt has the video's 8: vLLM's processor expands it to 8 again.
    assert p["prompt_token_ids"] == [1, 2, PAD, 3, 4] and len(req.prompt_ids) == 12
    v = p["multi_modal_data"]["video"]
    assert set(v) == {"video_embeds", "video_grid_thw", "second_per_grid_ts"}
    assert torch.equal(v["video_embeds"], video.embeds) and v["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert v["second_per_grid_ts"].dtype == torch.float64 and v["second_per_grid_ts"].tolist() == [0.5]
    assert engine_prompt(RolloutRequest([5, 6], 1), CONFIG) == {"prompt_token_ids": [5, 6]}
    with pytest.raises(ValueError, match="config"):  # a video's pad id and grid rule come from it
        engine_prompt(req, None)


def test_engine_prompt_refuses_positions_vllm_would_not_use_and_reduced_videos():
    req, video = _request("other")
    with pytest.raises(ValueError, match="not vLLM's"):
        engine_prompt(req, CONFIG)
    req, video = _request("vllm")
    req.media.video.keep = torch.ones(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="token-reduced"):
        engine_prompt(req, CONFIG)
