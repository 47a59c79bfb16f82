"""APRIL: active partial rollouts (arXiv 2509.18521).

In synchronous RL rollout every step waits for its longest response, and with long-tailed
response lengths most decoding slots sit idle for most of the step. APRIL launches more
groups than it needs, stops as soon as the target number of groups is complete, aborts the
rest and parks their partial responses in a buffer; the next step resumes them first.

One call of `AprilScheduler.next_step(prompts, n_groups)`:
1. Reset buffered samples older than `max_staleness` policy versions (see below).
2. Launch ceil(over_provision * n_groups) groups: parked groups first (oldest first), then
   new prompts. Only unfinished samples go to the engine; a resumed sample continues from its
   token ids (never re-tokenised text) with max_new_tokens reduced by what it holds.
3. Step the engine until n_groups groups have all G samples finished; abort everything else.
4. Return those groups (in launch order) and park every other launched group: finished
   samples are kept as they are, unfinished ones keep their tokens, behaviour log-probs and
   per-token policy versions.

Shapes in the off-policy helpers: B = samples, T = response tokens (right-padded).

Choices the paper leaves open, and departures
- Staleness is per sample: a buffered sample whose oldest token is more than `max_staleness`
  versions old is reset and regenerated from scratch *within its group*, so a group is never
  split, shrunk or duplicated; its other samples are kept. Checked at the start of each call,
  so every returned token satisfies current_version - token_version <= max_staleness.
- Exactly n_groups groups are returned. Groups that complete beyond the target on the same
  engine step stay in the buffer, complete, and are returned first next time.
- `partial=False` is over-provisioning without a buffer: unfinished groups are discarded at
  the stop (their prompts are consumed). With over_provision=1.0 it is plain synchronous
  generation: every launched group completes and is returned.
- Sampling seeds are per sample and per launch (`mix_seed(seed, group_id, index, launch)`),
  so results do not depend on the slot count or on which requests share a batch.
- Off-policy tokens are handled by the trainer with `offpolicy_mask` (drop them from the loss)
  or `tis_weights` (truncated importance sampling); recomputing behaviour log-probs under the
  current policy is the third option and needs no helper here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Protocol

import torch

from longrl.rollout.continuous import Request, Result, mix_seed


class Engine(Protocol):
    """What the scheduler needs of an engine (`ContinuousEngine`, or a fake in tests)."""

    policy_version: int
    num_slots: int
    steps: int
    busy_slot_steps: int
    tokens_generated: int

    @property
    def has_work(self) -> bool: ...

    def submit(self, requests: Iterable[Request]) -> None: ...

    def step(self) -> list[Result]: ...

    def abort_all(self) -> list[Result]: ...


@dataclass
class Sample:
    """One response of a group, possibly still unfinished (parked)."""

    prompt_id: Hashable
    group_id: int
    """Unique per launched group (a prompt seen twice gets two group ids)."""
    index: int
    """Position of this sample in its group, 0..G-1."""
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """Behaviour log-prob of each response token (the policy version that sampled it)."""
    versions: list[int] = field(default_factory=list)
    """Policy version that sampled each response token."""
    finish_reason: str | None = None
    """'stop' or 'length' once finished; None while unfinished."""
    launches: int = 0
    """Times this sample was sent to the engine (seeds each launch differently)."""
    loss_mask: list[int] = field(default_factory=list)
    """Per response token: 1 = sampled by a policy, 0 = a tool result (multi-turn episodes)."""
    episode: dict | None = None
    """A multi-turn episode's state (`rollout/episodes.AprilEpisodes`); None for single-turn."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def reset(self) -> None:
        """Forget all tokens: the sample will be regenerated from scratch."""
        self.response_ids, self.logprobs, self.versions, self.finish_reason = [], [], [], None
        self.loss_mask, self.episode = [], None


@dataclass
class _Group:
    prompt_id: Hashable
    group_id: int
    samples: list[Sample]

    @property
    def complete(self) -> bool:
        return all(s.finished for s in self.samples)


@dataclass
class StepStats:
    """What one `next_step` call did. `metrics()` gives grouped metric names."""

    policy_version: int
    groups: int
    tokens_generated: int
    """Tokens the engine sampled during this call (useful or not)."""
    trained_tokens: int
    """Response tokens in the returned groups (some may come from earlier calls)."""
    discarded_tokens: int
    """Tokens thrown away: stale resets, and unfinished groups when partial=False."""
    dropped_groups: int
    """Unfinished groups thrown away at the stop (partial=False only)."""
    engine_steps: int
    slot_utilisation: float
    """Busy slot-steps / total slot-steps of the engine during this call."""
    offpolicy_token_frac: float
    """Fraction of returned tokens sampled by an older policy version."""
    mean_staleness: float
    """Mean over returned tokens of (current version - token version)."""
    max_staleness: int
    parked_samples: int
    """Unfinished samples with at least one token in the buffer after this call."""
    buffered_groups: int
    stale_resets: int
    """Buffered samples reset for exceeding max_staleness at the start of this call."""
    prompts_used: int
    """New prompts taken from the `prompts` iterable."""

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/tokens_generated": self.tokens_generated,
            "rollout/trained_tokens": self.trained_tokens,
            "rollout/discarded_tokens": self.discarded_tokens,
            "rollout/dropped_groups": self.dropped_groups,
            "rollout/engine_steps": self.engine_steps,
            "rollout/slot_util": self.slot_utilisation,
            "rollout/offpolicy_frac": self.offpolicy_token_frac,
            "rollout/staleness_mean": self.mean_staleness,
            "rollout/staleness_max": self.max_staleness,
            "rollout/parked_samples": self.parked_samples,
            "rollout/buffered_groups": self.buffered_groups,
            "rollout/stale_resets": self.stale_resets,
        }


class AprilScheduler:
    """Over-provision, stop at the target, park the rest, resume them first next time."""

    def __init__(
        self,
        engine: Engine,
        group_size: int,
        over_provision: float = 2.0,
        max_staleness: int | None = 4,
        partial: bool = True,
        *,
        max_new_tokens: int,
        seed: int = 0,
        episodes=None,
    ):
        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"group_size={group_size} and max_new_tokens={max_new_tokens} must be at least 1")
        if over_provision < 1.0:
            raise ValueError(f"over_provision={over_provision} must be >= 1.0")
        self.engine = engine
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.over_provision = over_provision
        self.max_staleness = max_staleness
        self.partial = partial
        self.seed = seed
        self.episodes = episodes  # `rollout.episodes.AprilEpisodes` for multi-turn tool use; None: one turn
        self.buffer: list[_Group] = []  # parked groups, oldest first
        self.next_group_id = 0  # id of the next new group; saved with `buffer` so a resumed run continues the ids

    def next_step(
        self, prompts: Iterable[tuple[Hashable, list[int]]], n_groups: int
    ) -> tuple[list[list[Sample]], StepStats]:
        """Return `n_groups` complete groups of G samples (fewer only if prompts run out).

        `prompts` yields (prompt_id, prompt token ids); only as many are taken as needed, so
        pass an iterator to keep the unused ones.
        """
        eng = self.engine
        if eng.has_work:
            raise RuntimeError("AprilScheduler needs an idle engine (it aborts everything it does not finish)")
        version = eng.policy_version
        steps0, busy0, tok0 = eng.steps, eng.busy_slot_steps, eng.tokens_generated
        resets, discarded = self._reset_stale(version)

        # ---- launch: parked groups first, then new prompts
        n_launch = math.ceil(self.over_provision * n_groups - 1e-9)
        launched, self.buffer = self.buffer[:n_launch], self.buffer[n_launch:]
        prompt_iter = iter(prompts)
        prompts_used = 0
        while len(launched) < n_launch:
            item = next(prompt_iter, None)
            if item is None:
                break
            launched.append(self._new_group(*item))
            prompts_used += 1
        by_request = {}
        requests = []
        for g in launched:
            for s in g.samples:
                if not s.finished:
                    by_request[(s.group_id, s.index)] = s
                    requests.append(self._request(s))
        eng.submit(requests)

        # ---- decode until n_groups groups are complete
        done = [g for g in launched if g.complete]
        by_group = {g.group_id: g for g in launched}
        while len(done) < n_groups and eng.has_work:
            for res in eng.step():
                sample = by_request[res.request_id]
                _append(sample, res)
                if self.episodes is not None and self.episodes.turn_ended(sample):
                    eng.submit([self._request(sample)])  # the tool answered: the next turn starts now
                    continue
                group = by_group[sample.group_id]
                if group.complete:
                    done.append(group)

        # ---- stop: abort the rest and park (or discard) it
        for res in eng.abort_all():
            sample = by_request[res.request_id]
            if self.partial:
                _append(sample, res)
            else:
                discarded += len(res.token_ids)
        returned = sorted(done[:n_groups], key=lambda g: g.group_id)
        returned_ids = {g.group_id for g in returned}
        rest = [g for g in launched if g.group_id not in returned_ids]
        dropped = 0
        if not self.partial:
            dropped = sum(not g.complete for g in rest)
            discarded += sum(len(s.response_ids) for g in rest if not g.complete for s in g.samples)
            rest = [g for g in rest if g.complete]
        self.buffer = sorted(rest + self.buffer, key=lambda g: g.group_id)

        groups = [g.samples for g in returned]
        stats = self._stats(groups, version, eng, (steps0, busy0, tok0), discarded, resets, prompts_used)
        stats.dropped_groups = dropped
        return groups, stats

    # ------------------------------------------------------------------ plumbing

    def _new_group(self, prompt_id: Hashable, prompt_ids: list[int]) -> _Group:
        gid = self.next_group_id
        self.next_group_id += 1
        samples = [Sample(prompt_id, gid, i, list(prompt_ids)) for i in range(self.group_size)]
        return _Group(prompt_id, gid, samples)

    def _request(self, s: Sample) -> Request:
        s.launches += 1
        if self.episodes is None:
            budget, stop = self.max_new_tokens - len(s.response_ids), ()
        else:
            budget, stop = self.episodes.budget(s), self.episodes.stop_ids
        return Request(
            request_id=(s.group_id, s.index),
            prompt_ids=s.prompt_ids,
            max_new_tokens=budget,
            resume_ids=list(s.response_ids),
            seed=mix_seed(self.seed, s.group_id, s.index, s.launches),
            stop_ids=stop,
        )

    def _reset_stale(self, version: int) -> tuple[int, int]:
        """Reset buffered samples whose oldest token is too old; returns (resets, tokens)."""
        if self.max_staleness is None:
            return 0, 0
        resets = tokens = 0
        for g in self.buffer:
            for s in g.samples:
                if s.versions and version - min(s.versions) > self.max_staleness:
                    resets += 1
                    tokens += len(s.response_ids)
                    s.reset()
        return resets, tokens

    def _stats(self, groups, version, eng, start, discarded, resets, prompts_used) -> StepStats:
        steps0, busy0, tok0 = start
        ages = [version - v for g in groups for s in g for v in s.versions]
        steps = eng.steps - steps0
        parked = sum(1 for g in self.buffer for s in g.samples if not s.finished and s.response_ids)
        return StepStats(
            policy_version=version,
            groups=len(groups),
            tokens_generated=eng.tokens_generated - tok0,
            trained_tokens=len(ages),
            discarded_tokens=discarded,
            dropped_groups=0,
            engine_steps=steps,
            slot_utilisation=(eng.busy_slot_steps - busy0) / (steps * eng.num_slots) if steps else 0.0,
            offpolicy_token_frac=sum(a > 0 for a in ages) / len(ages) if ages else 0.0,
            mean_staleness=sum(ages) / len(ages) if ages else 0.0,
            max_staleness=max(ages, default=0),
            parked_samples=parked,
            buffered_groups=len(self.buffer),
            stale_resets=resets,
            prompts_used=prompts_used,
        )


def _append(sample: Sample, res: Result) -> None:
    """Add an engine result to a sample; tokens, log-probs and versions stay aligned."""
    assert len(res.token_ids) == len(res.logprobs) == len(res.versions)
    sample.response_ids += res.token_ids
    sample.logprobs += res.logprobs
    sample.versions += res.versions
    sample.loss_mask += [1] * len(res.token_ids)
    if res.finish_reason != "abort":
        sample.finish_reason = res.finish_reason


# ---------------------------------------------------------------------- off-policy helpers


def offpolicy_mask(versions: torch.Tensor, current_version: int) -> torch.Tensor:
    """versions [B, T] -> keep [B, T] bool: True where the current policy sampled the token.

    Multiply into the loss mask to drop tokens sampled by older policies. Padding positions
    should hold a negative version so they come out False.
    """
    return versions == current_version


def tis_weights(trainer_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, clip: float) -> torch.Tensor:
    """Truncated importance weights min(exp(trainer - behaviour), clip), detached. [B, T]."""
    return torch.exp(trainer_logprobs - behaviour_logprobs).clamp(max=clip).detach()
