"""Your own tool and your own environment for longrl's multi-turn episodes.

A tool: any class with `name`, `description` and `__call__(args: str) -> str`. Offer it to
a run with `tools.enabled=[search,examples/agent_tools.py:Calculator]`; the model calls it as
`<call>calc: 12*7</call>` and sees `<result>84</result>`. Errors, hangs and huge outputs
are caught by longrl (`longrl.tools.call_tool`): raise freely.

An environment: `reset(example) -> state` (a plain dict: it is checkpointed with parked
APRIL samples) and `step(state, turn_text) -> observation text, or None when the turn is
the final answer`, plus `stop_ids`, the token ids that end a turn. `python
examples/agent_tools.py` runs a few episodes of `Countdown` on the tiny model.
"""

import ast
import operator


class Calculator:
    name = "calc"
    description = "calc(expression): the value of an arithmetic expression"
    _ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
            ast.Mod: operator.mod, ast.USub: operator.neg}

    def __call__(self, args: str) -> str:
        return str(self._eval(ast.parse(args.strip(), mode="eval").body))

    def _eval(self, node):  # no eval(): only numbers and + - * // %
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in self._ops:
            return self._ops[type(node.op)](self._eval(node.left), self._eval(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in self._ops:
            return self._ops[type(node.op)](self._eval(node.operand))
        raise ValueError("only integers and + - * // %")


class Countdown:
    """A guessing game: the model writes `<call>guess: N</call>` and hears higher / lower,
    until it answers `<answer>N</answer>` (the final turn)."""

    def __init__(self, tokenizer, target_of):
        self.stop_ids = (tokenizer.convert_tokens_to_ids("</call>"),)
        self.target_of = target_of  # example -> the secret number

    def reset(self, example) -> dict:
        return {"target": self.target_of(example), "guesses": 0}

    def step(self, state: dict, turn_text: str) -> str | None:
        if not turn_text.endswith("</call>"):
            return None  # an answer: the episode is over
        state["guesses"] += 1
        try:
            guess = int(turn_text.rsplit(":", 1)[-1].removesuffix("</call>"))
        except ValueError:
            return "<result>write a whole number</result>"
        hint = "higher" if guess < state["target"] else "lower" if guess > state["target"] else "yes"
        return f"<result>{hint}</result>"


if __name__ == "__main__":
    import torch

    from longrl.config import TinyModelConfig
    from longrl.models.tiny import TOOL_TOKENS, build_tiny_model, build_tiny_tokenizer
    from longrl.rollout.base import RolloutRequest, SamplingParams
    from longrl.rollout.episodes import TurnLimits, run_episodes
    from longrl.rollout.hf import HFBackend

    tok = build_tiny_tokenizer(TOOL_TOKENS)
    model = build_tiny_model(TinyModelConfig(), tok)  # untrained: it babbles, the loop still runs
    env = Countdown(tok, target_of=lambda ex: 42)
    prompts = [RolloutRequest(tok("guess 1-99:", add_special_tokens=False)["input_ids"], n=2)]
    eps = run_episodes(HFBackend(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id), prompts, env, [None],
                       SamplingParams(64), torch.Generator().manual_seed(0), TurnLimits(4, 16, 64), tok)
    for ep in eps:
        print(ep.turns, ep.finish_reason, repr(tok.decode(ep.response_ids)))
    print(Calculator()("12*7"))
