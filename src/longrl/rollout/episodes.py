"""Multi-turn episodes: the model calls tools, their results join the context, up to
`rollout.max_turns` model turns.

Token in, token out: the ids the model generated are the ids trained on; a tool's result is
tokenised once and appended; the conversation is never re-tokenised. Each response carries a
loss mask: 1 on the model's tokens, 0 on tool-result tokens, which take no policy loss, no
KL, no entropy and do not count in the loss normaliser (the trainer multiplies the mask into
its token mask before anything is computed).

Letters: B = episodes, one per sample (a request with n samples opens n episodes).

    Environment   reset(example) -> state (a plain dict: it is checkpointed with APRIL's
                  parked samples); step(state, turn_text) -> observation text, or None when
                  the turn was the final answer; its `stop_ids` end a tool-calling turn
    ToolEnvironment  the environment of tool-using tasks: parses a call in the tool format
                  (`TagFormat`: `<call>name: args</call>` -> `<result>...</result>`, for the
                  tiny model's single-token tags; `HermesFormat`: Qwen's
                  `<tool_call>{json}</tool_call>` -> `<tool_response>` user turn), runs it
                  through `tools.call_tool` (timeout, size cap, errors as results), counts
                  calls, errors and well-formed turns for the rewards and metrics
    run_episodes  the episode loop over any backend's `generate`: one call per turn for all
                  live episodes (rows of one call are in different turns: each episode moves
                  on its own), the tools of a turn run concurrently
    AprilEpisodes the same turns inside APRIL's scheduler (`rollout/april.py`): a finished
                  tool call is answered and resubmitted at once while other rows decode, and
                  a parked episode resumes mid-turn or between turns from its token ids

Budgets (both enforced, both counted, never silent): `rollout.max_new_tokens` is the total of
the response, model and tool tokens together (what the context must hold);
`rollout.max_turn_tokens` caps one model turn. A turn cut by its cap ends the episode
(finish 'length', `agent/truncated_turns`); a tool result that does not fit the total is
cut and ends it too; a tool call at the last allowed turn ends it (`agent/turn_limit`).

With no tools (`NoTools`, every single-turn task) `run_episodes` makes exactly the one
`generate` call the single-turn rollout made, so those runs are unchanged bit for bit.

Media in observations (the `video_frames` tool): a tool result may add media to the
conversation (`Observation.media`: segment specs, each standing behind a run of
`Observation.media_token` ids in the result's tokens). The episode records each one with
its offset in the response (`Episode.media`); a later turn's request is the first
request's media continued over the whole context (`media.continued(context_ids, media)`,
e.g. `policy.video.VideoPrompt`), so the next turn sees the new video tokens; and the
row's example carries them for the training passes (`episode_example`). A result cut by
the total budget drops any media it could not hold whole.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from longrl.rollout.base import RolloutRequest, SamplingParams


class Environment(Protocol):
    stop_ids: tuple[int, ...]
    """Token ids that end a tool-calling turn (empty: single-turn)."""

    def reset(self, example) -> dict: ...

    def step(self, state: dict, turn_text: str) -> str | None:
        """The observation text for a turn that called a tool (appended to the context), or
        None when the turn is final (an answer, or no call)."""
        ...


@dataclass(frozen=True)
class Observation:
    """A tool result that adds media: its text (with one run of `media_token` per medium,
    in order) and the media (specs a policy can encode, e.g. `media.segments`)."""

    text: str
    media: tuple[str, ...] = ()
    media_token: int = -1


class NoTools:
    """Single-turn: every turn is final."""

    stop_ids: tuple[int, ...] = ()

    def reset(self, example) -> dict:
        return {}

    def step(self, state: dict, turn_text: str) -> str | None:
        return None


# ----------------------------------------------------------------------------------------
# Tool-call formats
# ----------------------------------------------------------------------------------------


class TagFormat:
    """`<call>name: args</call>` ... `<result>text</result>` (one token per tag in the tiny
    tokenizer: `models.tiny.TOOL_TOKENS`)."""

    name = "tags"
    call_open, call_close, result_open, result_close = "<call>", "</call>", "<result>", "</result>"
    _CALL = re.compile(r"<call>\s*([A-Za-z_][\w-]*)\s*:?(.*?)</call>\s*$", re.S)

    def parse(self, turn_text: str) -> tuple[str, str] | None:
        m = self._CALL.search(turn_text)
        return (m.group(1), m.group(2).strip()) if m else None

    def observation(self, text: str) -> str:
        return f"{self.result_open}{text}{self.result_close}"


class HermesFormat:
    """Qwen2.5 / Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; the
    result comes back as the chat template's tool turn, `<tool_response>` inside a user
    message, and the assistant's next turn is opened. Our tools take one string: the first
    string argument is it (the arguments' JSON when none is a string)."""

    name = "hermes"
    call_open, call_close, result_open, result_close = "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>\s*$", re.S)

    def parse(self, turn_text: str) -> tuple[str, str] | None:
        m = self._CALL.search(turn_text)
        if not m:
            return None
        try:
            call = json.loads(m.group(1))
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        args = call.get("arguments", {})
        if isinstance(args, str):
            return call["name"], args
        if not isinstance(args, dict):
            return call["name"], ""
        first = next((v for v in args.values() if isinstance(v, str)), None)
        # No string argument (video_frames' start and end seconds): the tool reads the JSON.
        return call["name"], json.dumps(args) if first is None and args else (first or "")

    def observation(self, text: str) -> str:
        return (f"<|im_end|>\n<|im_start|>user\n{self.result_open}\n{text}\n{self.result_close}<|im_end|>\n"
                "<|im_start|>assistant\n")


FORMATS = {"tags": TagFormat, "hermes": HermesFormat}


def tool_instruction(fmt, tools: dict) -> str:
    """What a chat model is told about its tools (appended to its system message): each
    tool's description and how to call one in `fmt`."""
    example = (f'{fmt.call_open}{{"name": "NAME", "arguments": {{"input": "..."}}}}{fmt.call_close}'
               if fmt.name == "hermes" else f"{fmt.call_open}NAME: input{fmt.call_close}")
    listed = "; ".join(f"{t.name}: {t.description}" for t in tools.values())
    return (f" You may call a tool, one per turn, by ending your turn with {example}; its result comes back in "
            f"{fmt.result_open} {fmt.result_close}. Tools: {listed}.")


def pick_format(name: str, tokenizer):
    """`tools.format`: 'auto' is hermes where the tokenizer has `</tool_call>` as one token
    (Qwen2.5 and its kin), else tags. The closing tag of a call must be one token: it is
    the stop id that ends the turn."""
    from longrl.errors import UserError

    if name == "auto":
        name = "hermes" if _single_id(tokenizer, HermesFormat.call_close) is not None else "tags"
    if name not in FORMATS:
        raise UserError(f"tools.format={name!r}: choose 'auto', 'tags' or 'hermes'")
    fmt = FORMATS[name]()
    if _single_id(tokenizer, fmt.call_close) is None:
        raise UserError(f"tools.format={name}: the tokenizer has no single token for {fmt.call_close!r}, which must end "
                        "a tool-calling turn; use the tiny model (it gets the tags), a tokenizer with Qwen's "
                        "<tool_call> tokens (tools.format=hermes), or add the token to the tokenizer")
    return fmt


def _single_id(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def observation_mask(ids: list[int], open_id: int, close_id: int) -> list[int]:
    """1 on model tokens, 0 from each `open_id` through its `close_id` (a tool result inside a
    demonstration, `recipes/sft.py`). An unclosed result masks to the end."""
    out, inside = [], False
    for t in ids:
        if t == open_id:
            inside = True
        out.append(0 if inside else 1)
        if t == close_id:
            inside = False
    return out


# ----------------------------------------------------------------------------------------
# The environment of tool-using tasks
# ----------------------------------------------------------------------------------------


class ToolEnvironment:
    """Tools called in `fmt`; per episode it counts what the rewards and metrics need:
    state = {"turns", "calls": {tool: n}, "errors", "well_formed": [0/1 per tool turn]}."""

    def __init__(self, tools: dict, fmt, tokenizer, *, timeout_s: float = 10.0, max_chars: int = 2000):
        self.tools, self.fmt, self.timeout_s, self.max_chars = tools, fmt, timeout_s, max_chars
        self.stop_ids = (_single_id(tokenizer, fmt.call_close),)
        # A tool whose results hold media names the token that stands for them (`tools.video_frames`).
        self.media_tokens = {n: _single_id(tokenizer, t.media_token) for n, t in tools.items() if hasattr(t, "media_token")}

    def reset(self, example) -> dict:
        state = {"calls": {}, "errors": 0, "truncated_results": 0, "well_formed": []}
        if self.media_tokens:  # the tools that read the episode's video need its path
            state["media"] = list(example.media)
        return state

    def step(self, state: dict, turn_text: str) -> str | Observation | None:
        from longrl.tools import call_tool

        if not turn_text.rstrip().endswith(self.fmt.call_close):
            return None  # the final turn (an answer, EOS, or cut by a budget)
        call = self.fmt.parse(turn_text)
        if call is None:
            state["well_formed"].append(0)
            state["errors"] += 1
            return self.fmt.observation(f"error: malformed call; write {self.fmt.call_open}name: arguments{self.fmt.call_close}")
        name, args = call
        tool = self.tools.get(name)
        if tool is None:
            state["well_formed"].append(0)
            state["errors"] += 1
            return self.fmt.observation(f"error: unknown tool {name[:40]!r}; tools: {', '.join(self.tools)}")
        state["well_formed"].append(1)
        state["calls"][name] = state["calls"].get(name, 0) + 1
        if name in self.media_tokens:  # it reads the episode's own media
            tool = tool.with_media(state["media"])
        out = call_tool(tool, args, timeout_s=self.timeout_s, max_chars=self.max_chars)
        state["errors"] += int(out.error)
        state["truncated_results"] += int(out.truncated)
        if out.media:
            return Observation(self.fmt.observation(out.text), tuple(out.media), self.media_tokens[name])
        return self.fmt.observation(out.text)


# ----------------------------------------------------------------------------------------
# Episodes over any backend
# ----------------------------------------------------------------------------------------


@dataclass
class Episode:
    prompt_ids: list[int]
    state: dict
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """Behaviour log-probs; 0.0 on tool tokens (masked, never used)."""
    loss_mask: list[int] = field(default_factory=list)
    """1 = a model token (trained), 0 = a tool-result token."""
    turns: int = 0
    finish_reason: str | None = None
    truncated_turn: bool = False
    turn_limit: bool = False
    turn_texts: list[str] = field(default_factory=list)
    """Each model turn decoded (the rewards read these, never the tool results)."""
    prompt_media: object | None = None
    """The first request's media (None: token-only); later turns continue it."""
    media: list[tuple[str, int]] = field(default_factory=list)
    """Media the observations added: (spec, offset of its first token in the response)."""

    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def next_request(self) -> RolloutRequest:
        """The request of the episode's next turn: its whole context, and the first request's
        media continued over it (every medium so far spliced in)."""
        if self.prompt_media is None:
            return RolloutRequest(self.context(), 1)
        if not hasattr(self.prompt_media, "continued"):
            raise ValueError(f"{type(self.prompt_media).__name__} requests cannot continue a multi-turn episode")
        return RolloutRequest(self.context(), 1, self.prompt_media.continued(self.context(), list(self.media)))

    def record(self) -> dict:
        """The fields the rewards and metrics read, in the shape of an APRIL sample's episode."""
        return {"env": self.state, "turns": self.turns, "turn_texts": self.turn_texts,
                "truncated_turn": self.truncated_turn, "turn_limit": self.turn_limit, "media": list(self.media)}


def episode_example(example, media: list[tuple[str, int]]):
    """The example a row of the training passes answers: `example` with the media its
    episode's observations added appended to `media` (their response offsets in
    `meta["media_offsets"]`); `example` itself when there are none."""
    if not media:
        return example
    return replace(example, media=[*example.media, *(m for m, _ in media)],
                   meta={**example.meta, "media_offsets": [at for _, at in media]})


@dataclass(frozen=True)
class TurnLimits:
    max_turns: int = 1
    turn_tokens: int = 0
    """Most tokens of one model turn (0: only the total)."""
    total_tokens: int = 48
    """Most response tokens, model and tool together."""

    def budget(self, response_len: int, turn_len: int = 0) -> int:
        """Tokens the next (or current, `turn_len` tokens in) model turn may still generate."""
        left = self.total_tokens - response_len
        return min(left, self.turn_tokens - turn_len) if self.turn_tokens else left


def run_episodes(backend, requests: list[RolloutRequest], env: Environment, examples: list, sampling: SamplingParams,
                 generator: torch.Generator | None, limits: TurnLimits, tokenizer, pool: ThreadPoolExecutor | None = None
                 ) -> list[Episode]:
    """Episodes of `requests` (n each, in order; `examples[k]` is request k's). The first
    turn is the single-turn `generate` call exactly; later turns continue each live episode
    from its token ids."""
    eps = [Episode(list(r.prompt_ids), env.reset(ex), prompt_media=r.media) for r, ex in zip(requests, examples)
           for _ in range(r.n)]
    live = list(range(len(eps)))
    first = True
    while live:
        budget = {i: limits.budget(len(eps[i].response_ids)) for i in live}
        turn = replace(sampling, max_new_tokens=max(budget.values()), stop_ids=tuple(env.stop_ids))
        reqs = requests if first else [eps[i].next_request() for i in live]
        gens = backend.generate(reqs, turn, generator)
        first = False
        calling = []
        for i, g in zip(live, gens):
            ep = eps[i]
            ids, lps = g.response_ids[: budget[i]], g.logprobs[: budget[i]]
            cut = len(ids) < len(g.response_ids) or g.finish_reason == "length"
            ep.response_ids += ids
            ep.logprobs += lps
            ep.loss_mask += [1] * len(ids)
            ep.turns += 1
            ep.turn_texts.append(_text(tokenizer, ids))
            if cut:
                _end(ep, limits, "length")
            elif ids and ids[-1] in env.stop_ids and ep.turns >= limits.max_turns:
                ep.turn_limit, ep.finish_reason = True, "length"  # a call at the last allowed turn: no answer comes
            elif ids and ids[-1] in env.stop_ids:
                calling.append(i)
            else:
                ep.finish_reason = "stop"
        live = []
        observations = _observe(env, [eps[i] for i in calling], pool)
        for i, obs in zip(calling, observations):
            if _append_observation(eps[i], obs, env, limits, tokenizer):
                live.append(i)
    return eps


_POOL: ThreadPoolExecutor | None = None


def _observe(env: Environment, eps: list[Episode], pool: ThreadPoolExecutor | None) -> list[str | Observation | None]:
    """The tools of one turn, concurrently (each call has its own timeout, so a turn waits
    at most about one timeout however many calls hang)."""
    global _POOL
    if len(eps) <= 1:
        return [env.step(ep.state, ep.turn_texts[-1]) for ep in eps]
    if pool is None:
        _POOL = _POOL or ThreadPoolExecutor(max_workers=16, thread_name_prefix="longrl-turn")
        pool = _POOL
    return list(pool.map(lambda ep: env.step(ep.state, ep.turn_texts[-1]), eps))


def _append_observation(ep: Episode, obs: str | Observation | None, env: Environment, limits: TurnLimits,
                        tokenizer) -> bool:
    """Append a tool result (tokenised once) and record its media; True when the episode
    goes on to another turn."""
    if obs is None:
        ep.finish_reason = "stop"
        return False
    ids, cut = observation_ids(obs, len(ep.response_ids), limits, tokenizer)
    if cut:
        ep.finish_reason = "length"
    if isinstance(obs, Observation) and obs.media:
        ids, placed = place_media(ids, obs, cut)
        ep.media += [(m, len(ep.response_ids) + at) for m, at in placed]
    ep.response_ids += ids
    ep.logprobs += [0.0] * len(ids)
    ep.loss_mask += [0] * len(ids)
    return ep.finish_reason is None


def observation_ids(obs: str | Observation, response_len: int, limits: TurnLimits, tokenizer) -> tuple[list[int], bool]:
    """A tool result tokenised once, cut to the total budget (keeping room for one model
    token): (ids, whether it was cut, which ends the episode)."""
    ids = tokenizer(obs.text if isinstance(obs, Observation) else obs, add_special_tokens=False)["input_ids"]
    room = limits.total_tokens - response_len - 1
    return ids[: max(0, room)], len(ids) > room


def demonstration_example(example, response_ids: list[int], tokenizer):
    """The example an SFT demonstration row trains on: a demonstration that calls a media
    tool holds the tool's result verbatim, its media named in `meta["demo_media"]` and
    standing behind runs of `meta["demo_media_token"]` (e.g. `examples/video_flash.py`);
    they are spliced in like an episode's (`episode_example`). Others: `example` itself."""
    media = example.meta.get("demo_media") or []
    if not media:
        return example
    token = _single_id(tokenizer, example.meta["demo_media_token"])
    _, placed = place_media(response_ids, Observation("", tuple(media), token), cut=False)
    return episode_example(example, placed)


def place_media(ids: list[int], obs: Observation, cut: bool) -> tuple[list[int], list[tuple[str, int]]]:
    """Where each medium of `obs` sits in its result's `ids`: the k-th run of
    `obs.media_token` is the k-th medium. A result cut by the budget keeps only the media it
    holds whole, and is cut again before a medium it holds in part (whose tokens would
    stand for nothing). -> (ids, [(spec, offset in ids)])"""
    runs = [i for i, t in enumerate(ids) if t == obs.media_token and (i == 0 or ids[i - 1] != obs.media_token)]
    ends = [next((j for j in range(i, len(ids)) if ids[j] != obs.media_token), len(ids)) for i in runs]
    placed = []
    for spec, start, end in zip(obs.media, runs, ends):
        if cut and end == len(ids):  # the budget ran out inside this medium
            return ids[:start], placed
        placed.append((spec, start))
    if len(placed) < len(obs.media) and not cut:
        raise ValueError(f"a tool result names {len(obs.media)} media but holds {len(placed)} runs of token {obs.media_token}")
    return ids, placed


def _end(ep: Episode, limits: TurnLimits, reason: str) -> None:
    ep.finish_reason = reason
    # Cut by the per-turn cap while the total still had room: a truncated turn.
    ep.truncated_turn = bool(limits.turn_tokens) and len(ep.response_ids) < limits.total_tokens


def _text(tokenizer, ids: list[int]) -> str:
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def model_text(record: dict) -> str:
    """What the rewards read: the model's turns only, in order (tool results left out, so a
    result that happens to contain an `<answer>` block is never scored as the model's)."""
    return "".join(record["turn_texts"])


def episode_metrics(records: list[dict], tools=()) -> dict:
    """`agent/*` means over episodes: turns, tool calls per tool (every tool in `tools` and
    every tool called, 0 where none was), failed calls, turns cut by their cap, calls at the
    last allowed turn, tool results cut to fit."""
    n = max(1, len(records))
    envs = [r["env"] for r in records]
    out = {"agent/turns": sum(r["turns"] for r in records) / n,
           "agent/tool_errors": sum(e.get("errors", 0) for e in envs) / n,
           "agent/truncated_turns": sum(r["truncated_turn"] for r in records) / n,
           "agent/turn_limit": sum(r["turn_limit"] for r in records) / n,
           "agent/truncated_results": sum(e.get("truncated_results", 0) for e in envs) / n}
    for tool in sorted({t for e in envs for t in e.get("calls", {})} | set(tools)):
        out[f"agent/tool_calls/{tool}"] = sum(e.get("calls", {}).get(tool, 0) for e in envs) / n
    return out


# ----------------------------------------------------------------------------------------
# Episodes inside APRIL
# ----------------------------------------------------------------------------------------


class AprilEpisodes:
    """What `AprilScheduler` asks of multi-turn episodes: how many tokens a (re)submitted
    sample may generate, which ids end a turn, and what happens when a turn ends. A
    sample's episode state lives on the sample (`Sample.episode`, plain values), so it parks
    and is checkpointed with it: {"env": the environment's state, "turns", "turn_texts",
    "open": a turn is under way, "turn_start": where it began, "truncated_turn", "turn_limit"}."""

    def __init__(self, env: Environment, limits: TurnLimits, tokenizer, examples_of):
        self.env, self.limits, self.tokenizer, self.examples_of = env, limits, tokenizer, examples_of
        self.stop_ids = tuple(env.stop_ids)

    def budget(self, sample) -> int:
        """Tokens the sample may generate in this launch: what is left of the current turn
        (a turn resumed after a park counts what it already has) and of the total."""
        if sample.episode is None:
            sample.episode = {"env": self.env.reset(self.examples_of(sample.prompt_id)), "turns": 0,
                              "turn_texts": [], "open": False, "turn_start": 0,
                              "truncated_turn": False, "turn_limit": False}
        ep = sample.episode
        if not ep["open"]:
            ep["open"], ep["turn_start"] = True, len(sample.response_ids)
        return self.limits.budget(len(sample.response_ids), len(sample.response_ids) - ep["turn_start"])

    def turn_ended(self, sample) -> bool:
        """The engine finished the sample's turn ('stop' or 'length'). True when the episode
        goes on: a tool result was appended and the sample is unfinished again."""
        ep = sample.episode
        turn_ids = sample.response_ids[ep["turn_start"]:]
        ep["open"] = False
        ep["turns"] += 1
        ep["turn_texts"].append(_text(self.tokenizer, turn_ids))
        if sample.finish_reason == "length":
            ep["truncated_turn"] = bool(self.limits.turn_tokens) and len(sample.response_ids) < self.limits.total_tokens
            return False
        if not turn_ids or turn_ids[-1] not in self.stop_ids:
            return False
        if ep["turns"] >= self.limits.max_turns:  # a call at the last allowed turn: no answer comes
            ep["turn_limit"] = True
            sample.finish_reason = "length"
            return False
        obs = self.env.step(ep["env"], ep["turn_texts"][-1])
        if obs is None:
            return False
        if isinstance(obs, Observation) and obs.media:  # APRIL's engine takes token-only requests
            raise ValueError("a tool result with media (video_frames) needs rollout.partial=false")
        ids, cut = observation_ids(obs, len(sample.response_ids), self.limits, self.tokenizer)
        sample.response_ids += ids
        sample.logprobs += [0.0] * len(ids)
        sample.versions += [sample.versions[-1]] * len(ids)  # no policy sampled them; the turn's version keeps staleness honest
        sample.loss_mask += [0] * len(ids)
        if cut:
            sample.finish_reason = "length"
            return False
        sample.finish_reason = None
        return True


