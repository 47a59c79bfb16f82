"""Chain-of-thought SFT: maximise the likelihood of demonstration responses.

Each demonstration is `prompt + solution + EOS`; only the response tokens (solution and
EOS) are trained, prompt tokens are masked; so are the tool results inside a tool-using
demonstration (`<result>...</result>`, `rollout.episodes.observation_mask`), which the
model reads but never writes. The loss is the token-mean NLL over all
response tokens of the optimizer step (normaliser counted once per step), computed with
the chunked log-prob path, so no `[B, T, V]` logits are built. The policy (`policy/`: text
or video) runs the pass; the loop does not know which it is.
"""

from __future__ import annotations

import random
import time
from typing import Callable

from longrl.config import Config, lora_sft, phase_lr
from longrl.data.example import Example
from longrl.data.registry import demonstration
from longrl.parallel import dist
from longrl.policy.base import Policy
from longrl.metrics import Progress
from longrl.recipes.common import clip_and_step, make_optimizer, make_scheduler, on_positions, skipped_steps
from longrl.rl.losses import sft_loss
from longrl.streambp.logprobs import make_batch


def encode_demonstrations(policy: Policy, examples: list[Example]) -> tuple[list[list[int]], list[list[int]]]:
    tokenizer = policy.tokenizer
    prompts = policy.encode_prompts(examples)
    responses = [tokenizer(demonstration(ex), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for ex in examples]
    return prompts, responses


def demonstration_masks(tokenizer, responses: list[list[int]], cfg: Config) -> list[list[int]] | None:
    """Per response token 1 = trained, 0 = a tool result's (runs with tools); None otherwise."""
    if not cfg.tools.enabled:
        return None
    from longrl.rollout.episodes import observation_mask, pick_format

    fmt = pick_format(cfg.tools.format, tokenizer)
    open_id, close_id = (tokenizer.convert_tokens_to_ids(t) for t in (fmt.result_open, fmt.result_close))
    return [observation_mask(r, open_id, close_id) for r in responses]


def run_sft(policy: Policy, examples: list[Example], cfg: Config, device, log: Callable[[dict], None]) -> None:
    """`cfg.sft.steps` optimizer steps of `cfg.sft.batch_size` demonstrations each."""
    scfg = cfg.sft
    if scfg.steps == 0:
        return
    model, tokenizer = policy.model, policy.tokenizer
    prompts, responses = encode_demonstrations(policy, examples)
    masks = demonstration_masks(tokenizer, responses, cfg)
    if cfg.tools.enabled:  # a demonstration that calls a media tool trains on the media it shows
        from longrl.rollout.episodes import demonstration_example

        examples = [demonstration_example(ex, r, tokenizer) for ex, r in zip(examples, responses)]
    optimizer = make_optimizer(model, phase_lr(cfg, scfg.lr, lora_sft(cfg)), cfg.train.weight_decay,
                               shard=cfg.parallel.zero_optimizer)
    scheduler = make_scheduler(optimizer, scfg.warmup_steps, scfg.steps, decay=True)
    rng = random.Random(cfg.train.seed)
    order: list[int] = []
    lay = dist.layout()
    model.train()
    bar = Progress(scfg.steps, "sft", cfg.run.progress, cfg.run.log_every, enabled=dist.is_main())
    for step in range(1, scfg.steps + 1):
        t0 = time.time()
        if len(order) < scfg.batch_size:  # reshuffle each epoch
            order = list(range(len(examples)))
            rng.shuffle(order)
        b_idx, order = order[: scfg.batch_size], order[scfg.batch_size :]
        # Data parallel: each replica trains its share of the batch; the token count is global.
        # The ranks of a sequence-parallel group share one replica's batch (counted once).
        b_idx = [b_idx[j] for j in dist.shard_indices(len(b_idx), lay.dp_rank, lay.dp_size)]
        batch = make_batch([prompts[i] for i in b_idx], [responses[i] for i in b_idx],
                           tokenizer.pad_token_id).to(device)
        if masks is not None:  # tool results: read, not trained, not counted
            batch.mask *= on_positions([masks[i] for i in b_idx], batch.mask, 0.0)
        norm = dist.global_loss_normalizer(batch.mask, "token-mean", lay.dp_group)
        policy.start_step()  # video: this step's clips encoded once, their embeddings reused
        loss, _, _ = policy.loss_and_backward(batch, [examples[i] for i in b_idx],
                                              lambda lp: sft_loss(lp, batch.mask, norm), temperature=1.0)
        dist.all_reduce_gradients(model)  # whole world: DP replicas and each SP rank's positions
        loss = dist.all_reduce_sum(float(loss), lay.dp_group)
        lr = scheduler.get_last_lr()[0]  # the rate this update uses (the schedule moves on in the step)
        grad_norm = clip_and_step(model, optimizer, scheduler, cfg.train.grad_clip, loss=loss, where=f"SFT step {step}")
        record = {"phase": "sft", "step": step, "loss/sft": float(loss), "grad/norm": grad_norm,
                  "lr": lr, "train/skipped_steps": skipped_steps(optimizer),
                  "time/step": time.time() - t0, **policy.step_metrics()}
        log(record)
        bar.update(step, record)
    bar.close()
