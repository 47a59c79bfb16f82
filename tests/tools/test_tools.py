"""The agent tools (issue 15): search ranks the right passage, python runs sandboxed and is
cut off, a user's tool loads from a file, bad specs are one clear error."""

from pathlib import Path

import pytest

from longrl.errors import UserError
from longrl.tools import call_tool, load_object, make_tools
from longrl.tools.python import PythonTool
from longrl.tools.search import BM25Search

ROOT = Path(__file__).resolve().parents[2]


def test_search_returns_the_passage_about_the_query():
    docs = ["Vokari has color teal.", "Vokari has pet owl.", "Zemupa has color red.", "Zemupa has pet cat."]
    s = BM25Search(docs, top_k=1)
    assert s("Vokari pet") == "Vokari has pet owl."
    assert s("Zemupa color") == "Zemupa has color red."
    assert BM25Search(docs, top_k=2)("Vokari color").startswith("Vokari has color teal.")
    assert s("") == "no results (empty query)" and s("the of") == "no results"


def test_python_tool_prints_errors_and_times_out():
    tool = PythonTool(timeout_s=2.0)
    assert call_tool(tool, "print(6*7)", timeout_s=20, max_chars=100).text.strip() == "42"
    assert "ZeroDivisionError" in call_tool(tool, "1/0", timeout_s=20, max_chars=100).text
    out = call_tool(tool, "while True: pass", timeout_s=20, max_chars=100)
    assert out.error and "ran past" in out.text


def test_a_users_tool_loads_from_a_file_and_runs():
    tools = make_tools([f"{ROOT / 'examples' / 'agent_tools.py'}:Calculator"])
    assert call_tool(tools["calc"], "12*7", timeout_s=5, max_chars=50).text == "84"
    bad = call_tool(tools["calc"], "__import__('os')", timeout_s=5, max_chars=80)
    assert bad.error and "ValueError" in bad.text


@pytest.mark.parametrize("spec,match", [("nosuch.py:X", "not a file"), ("json:NoSuchThing", "cannot load"),
                                        ("no_such_module_x:Y", "cannot load")])
def test_bad_tool_specs_are_one_clear_error(spec, match):
    with pytest.raises(UserError, match=match):
        load_object(spec)


def test_search_without_a_corpus_is_refused():
    with pytest.raises(UserError, match="tools.search_corpus"):
        make_tools(["search"])
    with pytest.raises(UserError, match="no word to index"):
        BM25Search(["a b", "the of", "!!"])


@pytest.mark.parametrize("overrides,match", [
    (["tools.enabled=[search]"], "rollout.max_turns >= 2"),
    (["rollout.max_turns=3"], "a turn ends only by calling a tool"),
    (["tools.enabled=[browser]", "rollout.max_turns=3"], "tools.enabled"),
    (["tools.enabled=[search]", "rollout.max_turns=3", "reward.search_penalty=2"], "search_penalty"),
    (["tools.enabled=[search]", "rollout.max_turns=3", "rl.algorithm=dpo"], "grpo"),
])
def test_tool_settings_are_checked_at_load(overrides, match):
    from longrl.config import load_config

    with pytest.raises(UserError, match=match):
        load_config(None, overrides)


SMALL = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64", "task.name=facts",
         "task.n_train=64", "task.n_eval=8", "tools.enabled=[search]", "rollout.max_turns=3", "rollout.max_turn_tokens=24",
         "rollout.max_new_tokens=64", "eval.max_new_tokens=64", "sft.steps=4", "rl.steps=2", "rl.prompts_per_step=2",
         "rl.group_size=2", "rl.kl_coef=0.05", "reward.search_penalty=0.3", "run.progress=false"]


@pytest.mark.parametrize("extra", [[], ["rollout.partial=true"]], ids=["hf", "april"])
def test_a_search_agent_run_end_to_end(tmp_path, extra):
    """`longrl train` on the facts task with the search tool, synchronous and with APRIL:
    the run completes, logs agent/* metrics, and its summary splits held-out accuracy and
    searches by question kind."""
    import json

    from longrl.cli import main

    assert main(["train", *SMALL, *extra, f"run.out_dir={tmp_path}", "run.name=a"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    for when in ("eval_after_sft", "eval_after_rl"):
        assert {"eval/accuracy/needs_search", "eval/accuracy/no_search", "eval/turns"} <= set(summary[when])
    records = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r.get("phase") == "rl" and r.get("step", 0) > 0]
    assert rl and all("agent/turns" in r and "reward/search_penalty" in r for r in rl)


def test_a_chat_model_is_told_its_tools_in_the_system_message():
    from longrl.config import load_config
    from longrl.models.load import format_prompt, set_system_prompt
    from longrl.models.tiny import TOOL_TOKENS, build_tiny_tokenizer
    from longrl.recipes.tasks import load_task, with_environment

    cfg = load_config(None, ["task.name=facts", "task.n_train=20", "task.n_eval=4", "tools.enabled=[search]",
                             "rollout.max_turns=3"])
    tok = build_tiny_tokenizer(TOOL_TOKENS)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    set_system_prompt(tok, "auto")
    task = with_environment(load_task(cfg.task), cfg, tok)
    assert task.environment is not None
    prompt = format_prompt(tok, "Vokari color?")
    assert "<answer>" in prompt and "<call>NAME: input</call>" in prompt and "search(query)" in prompt
