"""The video-cache benchmark compares equal work: every variant makes the same update, the
`cached` one through the recipe's own VideoPolicy and rollout backend."""

import torch

from longrl.bench import video_cache as vc
from longrl.models.vlm import build_tiny_vlm, build_vlm_tokenizer


def tiny_args(**kw):
    a = vc.parse(["--group", "3", "--response-len", "3", "--repeats", "1", "--frames", "4", "--hidden", "64",
                  "--layers", "1", "--vision-hidden", "32", "--vision-depth", "1", "--device", "cpu"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


TOK = build_vlm_tokenizer()


def updated_weights(a, variant):
    """(weights after one step, phase times) from the same initial model and seeds."""
    torch.manual_seed(0)
    tok = TOK
    model = build_tiny_vlm(tok, vc.shape_from(a)).double()
    model.model.visual.requires_grad_(a.train_vision)
    # Plain SGD: the update is the gradient itself. (Adam would blow the ~1e-13 float noise on
    # gradients that are exactly zero in theory, like the key bias's, up to lr-sized steps.)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    clip = torch.randint(0, 256, (4, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    phases = vc.Phases(torch.device("cpu"))
    vc.grpo_step(model, opt, clip, 1.0, "Q?", variant, a, phases, torch.Generator().manual_seed(1))
    return {k: p.detach().clone() for k, p in model.named_parameters()}, phases.times


def test_variants_make_the_same_update():
    for train_vision in (False, True):
        a = tiny_args(train_vision=train_vision)
        (ref, ref_phases), *others = [updated_weights(a, v) for v in vc.VARIANTS]
        assert set(ref_phases) == {"rollout", "old_logprobs", "ref_logprobs", "update"}
        for v, (weights, phases) in zip(vc.VARIANTS[1:], others):
            assert ("encode" in phases) == v.startswith("cached")  # one encode per step, timed apart
            for k in ref:
                # Shared-prompt variants sum gradients in another order through Qwen2's float32
                # RMSNorm (see tests/models/test_models_vlm.py): equal to ~1e-7 relative.
                torch.testing.assert_close(weights[k], ref[k], atol=1e-9, rtol=1e-6)
        torch.manual_seed(0)
        fresh = dict(build_tiny_vlm(TOK, vc.shape_from(a)).double().named_parameters())
        vision_moved = any(not torch.equal(ref[k], fresh[k]) for k in ref if k.startswith("model.visual"))
        assert vision_moved == train_vision


def test_time_variants_reports_every_variant():
    out = vc.time_variants(tiny_args(), 4)
    assert out["video_tokens"] == 2 * 2 * 2
    for v in vc.VARIANTS:
        assert out[v]["step_s"] > 0 and out[v]["step_s"] <= out[v]["step_s_median"]
