"""`longrl eval`: greedy held-out accuracy of a saved model on a task (with tools: the
same multi-turn episodes as training, greedy, with turns and tool calls per question and
accuracy per kind of question where the task marks them)."""

from __future__ import annotations

import json

from longrl.config import eval_overrides, load_config
from longrl.errors import UserError
from longrl.eval.accuracy import evaluate
from longrl.utils import atomic_write_text, pick_device, seed_everything


def run_eval(overrides: list[str], config: str | None = None, out: str | None = None) -> dict:
    cfg = load_config(config, eval_overrides(overrides))
    if not cfg.model.path:
        raise UserError("longrl eval needs model=PATH (a Hugging Face model directory or runs/<name>/checkpoints/step_<N>)")
    seed_everything(cfg.train.seed)
    if cfg.train.threads > 0:  # as `longrl train` does: on a loaded machine fewer threads are faster
        import torch

        torch.set_num_threads(cfg.train.threads)
    from longrl.recipes.train import load_task_and_policy
    from longrl.rollout import make_backend

    device = pick_device(cfg.model.device)
    task, load, as_policy = load_task_and_policy(cfg, device)  # text or video: the same evaluation
    model, tokenizer = load(cfg.model, device)
    policy, backend = as_policy(model, tokenizer), make_backend(cfg, model, tokenizer)
    import sys

    from longrl.recipes.grpo import turn_limits
    from longrl.recipes.tasks import with_environment

    task = with_environment(task, cfg, tokenizer)  # tools.enabled: the run's episodes
    from longrl.recipes.train import derive_response_budgets

    budgets = derive_response_budgets(cfg, task, tokenizer, ("eval",))  # eval.max_new_tokens=0: as `longrl train` derives it
    if budgets:
        print(budgets, file=sys.stderr)

    result = evaluate(policy, backend, task.eval, task.score, max_new_tokens=cfg.eval.max_new_tokens,
                      batch_size=cfg.eval.batch_size, return_items=out is not None,
                      progress=cfg.run.progress and sys.stderr.isatty(),  # a bar on a terminal; stdout stays the JSON
                      environment=task.environment, limits=turn_limits(cfg, eval=True))
    items = result.pop("items", None)
    if out:
        atomic_write_text(out, "".join(json.dumps(it) + "\n" for it in items))
    return {"model": cfg.model.path, "task": task.name, "n": len(task.eval),
            "accuracy": result["eval/accuracy"], "format": result["eval/format"],
            "response_len": result["eval/response_len"],
            **{k.removeprefix("eval/"): v for k, v in result.items()  # per question kind, tool use
               if k.startswith(("eval/accuracy/", "eval/tool_calls", "eval/turns"))}}

