"""A text task with the correctness scorer the run asked for.

data/ gives the examples (and a dataset's own answer check, if it has one); rewards/ gives
the scorers; the choice between them is made here, above both, so that data/ imports no
reward code (../shared/DESIGN.md: data imports no recipe, engine or policy, and rewards
sit beside it). Video tasks get theirs the same way (`data.video_task.load_video_task(cfg,
score)` from `recipes/train.py`).

`reward.correctness=auto` means: the dataset's own check where it has one (reasoning-gym),
else a normalised match against `example.answer`; either reads the answer `reward.extract`
says (`rewards.verifiers.answer_extractor`: the `<answer>` block by default).
"""
from __future__ import annotations

from longrl.config import TaskConfig
from longrl.data.registry import TaskData, load_task_examples


def load_task(cfg: TaskConfig, correctness: str = "auto", extract: str = "auto") -> TaskData:
    """`task.*` examples scored by `correctness` (a `reward.correctness` value other than judge)
    on the answer `extract` (a `reward.extract` value) reads from each response."""
    from longrl.rewards.code import tests_of
    from longrl.rewards.verifiers import answer_scorer, extracted_answer_scorer

    # A named scorer is built first: the code sandbox announces its tier before any data is read.
    named = None if correctness == "auto" else answer_scorer(correctness, extract)
    # reward.correctness=code: every example must carry its tests; fail now, not mid-run.
    examples = load_task_examples(cfg, check=tests_of if correctness == "code" else None)
    if named is not None:
        score = named
    elif examples.check_answer is not None:
        score = extracted_answer_scorer(examples.check_answer, extract)
    else:
        score = answer_scorer("normalized", extract)
    return TaskData(name=examples.name, train=examples.train, eval=examples.eval, score=score, corpus=examples.corpus)


def with_environment(task: TaskData, cfg, tokenizer) -> TaskData:
    """`task` with its multi-turn environment when the run offers tools (`tools.enabled`):
    the tools (search over tools.search_corpus or the task's own corpus), the call format
    the tokenizer supports, the limits. Unchanged for single-turn runs."""
    if not cfg.tools.enabled:
        return task
    from dataclasses import replace

    from longrl.rollout.episodes import ToolEnvironment, pick_format
    from longrl.tools import make_tools

    corpus = cfg.tools.search_corpus or getattr(task, "corpus", None)
    sampling = getattr(task, "sampling", None)  # a video task's frames: video_frames' segments share their size
    if sampling is not None:
        sampling = replace(sampling, fps=cfg.tools.video_fps, max_frames=cfg.tools.video_max_frames)
    tools = make_tools(cfg.tools.enabled, corpus=corpus, top_k=cfg.tools.search_top_k,
                       python_timeout_s=cfg.tools.python_timeout, video_sampling=sampling)
    fmt = pick_format(cfg.tools.format, tokenizer)
    env = ToolEnvironment(tools, fmt, tokenizer, timeout_s=cfg.tools.timeout, max_chars=cfg.tools.max_result_chars)
    if getattr(tokenizer, "chat_template", None) and cfg.model.system_prompt == "auto":
        from longrl.rollout.episodes import tool_instruction

        # A chat model is told its tools in its system message (the tiny model learns them by SFT).
        tokenizer.longrl_system_prompt = (getattr(tokenizer, "longrl_system_prompt", "") + tool_instruction(fmt, tools)).strip()
    return replace(task, environment=env)
