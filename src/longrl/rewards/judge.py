"""Model-as-judge reward: a local Hugging Face causal LM rates whether a response's answer
matches the reference (`reward.correctness=judge`, `reward.judge_model=PATH`).

For answers no rule can check (open-ended video questions, free-form text). The judge sees
`reward.judge_template` filled with the question, the reference answer and the response's
`<answer>` block, wrapped in its chat template when it has one, and the reward is its
probability of answering yes rather than no at the next token:

    reward = p(yes) / (p(yes) + p(no)),   p over the first tokens of "yes"/"Yes"/" yes"/" Yes" (and no)
                                          that the two words do not share

A response without an answer block scores 0 (the judge is not asked). The judge is loaded
once, frozen, from a local directory only (no download), on the policy's device, and scores
one response per forward (no batching: a judge much larger than the policy would want it).
Departures from peer judges (e.g. an API model with a rubric): no sampling and no parsing
of a generated verdict, so the reward is a smooth, deterministic number.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longrl.data.example import Example
from longrl.errors import UserError
from longrl.rewards.answer import extract_answer

DEFAULT_TEMPLATE = ("Question:\n{question}\n\nReference answer:\n{reference}\n\nCandidate answer:\n{response}\n\n"
                    "Does the candidate answer mean the same as the reference answer? Reply with yes or no.")


class Judge:
    """A frozen local causal LM answering yes/no; `prob_yes` is the reward."""

    def __init__(self, path: str, device: torch.device, template: str = "", dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not path:
            raise UserError("reward.correctness=judge needs reward.judge_model=PATH (a local Hugging Face model directory)")
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"reward.judge_model '{path}' is not a Hugging Face model directory (no config.json)")
        self.template = template or DEFAULT_TEMPLATE
        for field in ("{question}", "{reference}", "{response}"):
            if field not in self.template:
                raise UserError(f"reward.judge_template must contain {field} (and {{question}}, {{reference}}, {{response}})")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        yes, no = self._first_tokens("yes"), self._first_tokens("no")
        # a token both words can start with (a lone space in a character vocabulary) tells nothing
        self.yes_ids, self.no_ids = yes - no, no - yes
        if not self.yes_ids or not self.no_ids:
            raise UserError(f"reward.judge_model '{path}': its tokenizer cannot tell 'yes' from 'no' by their first token")

    def _first_tokens(self, word: str) -> set[int]:
        ids = set()
        for variant in (word, word.capitalize(), " " + word, " " + word.capitalize()):
            tokens = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
            if tokens:
                ids.add(tokens[0])
        return ids

    def prompt(self, question: str, reference: str, response: str) -> str:
        text = self.template.format(question=question, reference=reference, response=response)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text + "\n"

    @torch.no_grad()
    def prob_yes(self, question: str, reference: str, response: str) -> float:
        ids = self.tokenizer(self.prompt(question, reference, response), add_special_tokens=False,
                             return_tensors="pt")["input_ids"].to(self.model.device)
        probs = torch.softmax(self.model(input_ids=ids).logits[0, -1].float(), -1)  # [V]
        yes = float(probs[list(self.yes_ids)].sum())
        no = float(probs[list(self.no_ids)].sum())
        return yes / (yes + no) if yes + no > 0 else 0.0


def judge_scorer(judge: Judge):
    """`correctness(response_text, example)` for `reward.correctness=judge`."""

    def score(response_text: str, example: Example) -> float:
        answer = extract_answer(response_text)
        if answer is None:
            return 0.0
        return judge.prob_yes(example.prompt, example.answer, answer)

    return score
