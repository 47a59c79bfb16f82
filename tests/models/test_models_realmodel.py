"""The real pretrained checkpoint, SmolLM2-135M-Instruct converted from its GGUF
(examples/get_smollm2.sh): it loads through longrl, follows its chat template and stops at
EOS, and one tiny GRPO step of `longrl train` runs on it end to end.

Marked `realmodel` and skipped when the converted directory is absent: nothing here
downloads. The directory is $LONGRL_SMOLLM2, else models/smollm2-135m-instruct in the clone
(where the script writes it; CI makes it once there).

What the GRPO step can and cannot show today: the instruct model does not write `<answer>`
tags (0 of 24 samples at temperature 1 with tag-demanding prompts when this was written), so
every reward is 0 and the advantages are 0. A KL term (rl.kl_coef > 0) keeps the step from
being skipped as signal-free, so the rollout, the reference and trainer passes, the backward
over the 49k-vocabulary head and the optimizer step all run on the real weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from longrl.cli import main

MODEL_DIR = Path(os.environ.get("LONGRL_SMOLLM2") or Path(__file__).resolve().parents[2] / "models" / "smollm2-135m-instruct")

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(),
                       reason=f"no converted SmolLM2 at {MODEL_DIR}: run examples/get_smollm2.sh (or set LONGRL_SMOLLM2)"),
]


@pytest.fixture(scope="module")
def policy():
    from longrl.config import ModelConfig
    from longrl.models.load import load_policy

    return load_policy(ModelConfig(path=str(MODEL_DIR)), torch.device("cpu"))


def test_loads_as_the_135m_llama_with_tied_embeddings(policy):
    model, tok = policy
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(tok) == model.config.vocab_size == 49152
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"


def test_follows_the_chat_template_and_stops_at_eos(policy):
    from longrl.models.load import FORMAT_INSTRUCTION, format_prompt

    model, tok = policy
    text = format_prompt(tok, "What is 2+3? Reply with the number only.")
    assert text == (f"<|im_start|>system\n{FORMAT_INSTRUCTION}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+3? Reply with the number only.<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=32, do_sample=False)  # [1, T + new]
    new = out[0, ids.input_ids.shape[1]:].tolist()
    assert tok.eos_token_id in new, tok.decode(new)  # an answer, then EOS, well inside the budget
    answer = tok.decode(new[: new.index(tok.eos_token_id)])
    assert "5" in answer, answer


def test_untagged_answers_are_read_by_the_chosen_extraction(policy):
    # Without a format instruction the instruct model answers in prose, no tags: the tag
    # reader gives it nothing, the last number reads its answer (reward.extract=last_number).
    from longrl.data.example import Example
    from longrl.models.load import format_prompt, set_system_prompt
    from longrl.rewards.verifiers import answer_scorer

    model, tok = policy
    set_system_prompt(tok, "")  # its own default system message
    try:
        ids = tok(format_prompt(tok, "State the final answer to the following arithmetic problem: 2 + 3 ="),
                  return_tensors="pt")
    finally:
        set_system_prompt(tok, "auto")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)  # [1, T + new]
    response = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    ex = Example(id="2+3", prompt="2 + 3 =", answer="5")
    assert "<answer>" not in response and answer_scorer("normalized", "tags")(response, ex) == 0.0, response
    assert answer_scorer("normalized", "last_number")(response, ex) == 1.0, response


def test_one_grpo_step_on_the_real_model(tmp_path):
    args = ["train", f"model.path={MODEL_DIR}", "sft.steps=0", "rl.steps=1", "rl.prompts_per_step=2",
            "rl.group_size=2", "rl.kl_coef=0.01", "rollout.max_new_tokens=16", "eval.max_new_tokens=16",
            "task.n_train=20", "task.n_eval=4", "run.progress=false", f"run.out_dir={tmp_path}", "run.name=r"]
    assert main(args) == 0
    run = tmp_path / "r"
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["step"] == 1 and rec["rollout/groups"] == 2
    assert rec["train/no_signal_steps"] == 0 and rec["train/skipped_steps"] == 0  # the update ran
    assert math.isfinite(rec["loss/policy"]) and math.isfinite(rec["loss/kl"])
    # the rollout engine and the trainer agree on the real model's log-probs
    assert rec["logprob/engine_trainer_gap"] < 1e-3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_1", local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(torch.isfinite(p).all() for p in model.parameters())
