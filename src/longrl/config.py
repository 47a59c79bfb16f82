"""The typed config tree.

Every knob lives in a dataclass below with a docstring-style comment. A YAML file and
`key=value` overrides on the command line only *override* these defaults; unknown keys
fail with the closest valid key. Derived values are computed in `Config.validate`, the one
place that checks cross-field constraints. The resolved config is written to the run
directory as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longrl.errors import UserError


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny model (used when `model.path` is empty). With `model.arch=gla`
    the GLA model uses hidden_size, num_layers, num_heads and intermediate_size; see `model.gla`."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention (query) heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than `num_heads`)."""
    intermediate_size: int = 384
    """Width of the MLP."""
    max_position_embeddings: int = 1024
    """Longest sequence the rotary embedding is configured for."""


@dataclass
class GLAModelConfig:
    """GLA-only shape of the built-in tiny model with `model.arch=gla` (widths, layers and
    heads come from `model.tiny`: hidden_size, num_layers, num_heads, intermediate_size)."""

    chunk_size: int = 16
    """GLA chunk length of the chunked training form; a speed knob, the result does not depend on it."""
    softmax_every: int = 0
    """Hybrid model: every k-th layer (1-based) is sliding-window softmax attention; 0 = pure GLA."""
    window: int = 64
    """Tokens each sliding-window softmax layer attends to (with softmax_every > 0)."""


@dataclass
class LoRAConfig:
    """LoRA adapters through peft (`longrl.models.lora`; the `lora` extra). Every training
    phase (SFT, RL, each DPO round) trains a fresh adapter that is merged into the base when
    the phase ends; the KL/DPO reference is the base with the adapter disabled."""

    r: int = 0
    """Adapter rank; 0 = no LoRA (full fine-tuning)."""
    alpha: float = 32.0
    """LoRA alpha: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input in training passes (the recomputed old log-probs too;
    rollouts run in eval mode). 0 keeps old and new log-probs of one step identical."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or name suffixes) that get adapters, e.g. [q_proj, v_proj] or
    'q_proj,v_proj'; 'all-linear': every linear layer but the LM head."""
    sft: bool | str = "auto"
    """Whether SFT trains an adapter too (merged before RL): true, false (SFT fine-tunes every
    weight and only RL trains adapters), or 'auto' (the default): adapters for a pretrained
    checkpoint (`model.path`), every weight for the randomly initialised tiny default, whose
    frozen random embeddings and head an adapter cannot make up for (`config.lora_sft`)."""
    lr_scale: float = 10.0
    """Adapters train at this many times the phase's learning rate (sft.lr, rl.lr: tuned for
    full fine-tuning). A rank-r update moves far less per step than a full one, so LoRA wants
    a larger rate (about 10x in the LoRA paper's and most peers' recipes); 1 keeps the phase's
    rate (`config.phase_lr`)."""


@dataclass
class ModelConfig:
    path: str = ""
    """Local Hugging Face model directory. Empty: build the tiny default from `model.tiny`."""
    arch: str = "qwen2"
    """Architecture of the built-in tiny model: 'qwen2' (softmax attention) or 'gla' (gated
    linear attention, `longrl.models.gla`, shaped by `model.tiny` and `model.gla`). Ignored
    with `model.path`: the checkpoint's config.json decides."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny default model."""
    gla: GLAModelConfig = field(default_factory=GLAModelConfig)
    """GLA-only shape of the tiny default model (with model.arch=gla)."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu' or 'cuda'."""
    system_prompt: str = "auto"
    """System message for chat-template (instruct) models: 'auto' asks for the response format
    (`longrl.models.load.FORMAT_INSTRUCTION`: reasoning in <think>, final answer in <answer>);
    '' sends none; any other text is sent as it is. Unused by the tiny model (no template)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (`model.lora.r > 0`) instead of full fine-tuning."""


@dataclass
class TaskConfig:
    name: str = "addition"
    """Task: a built-in family ('addition', 'sort'; 'facts' for tool-using agents, with its
    search corpus), 'rg:<name>' for a reasoning-gym task, 'jsonl' for
    `task.train_file`/`task.eval_file`, or 'hf:<source>' for a data set read with
    the `datasets` library: a local JSON/JSONL/parquet/arrow/CSV file, a `save_to_disk`
    directory, or a hub id already in the local Hugging Face cache (`data/hf_datasets.py`)."""
    train_file: str = ""
    """JSONL of {"prompt": ..., "answer": ...} per line (with task.name=jsonl)."""
    eval_file: str = ""
    """JSONL for held-out evaluation (with task.name=jsonl; with hf:<source> a local data file
    or saved data set); empty: split off the train file."""
    prompt_column: str = "prompt"
    """With task.name=hf:<source>: the column holding the prompt, a string or a chat (a list
    of {"role", "content"} messages)."""
    answer_column: str = "answer"
    """With task.name=hf:<source>: the column holding the reference answer (string or number)."""
    solution_column: str = ""
    """With task.name=hf:<source>: a column of CoT-SFT demonstrations; empty: none (SFT then
    demonstrates the bare `<answer>`)."""
    id_column: str = ""
    """With task.name=hf:<source>: a column of unique example ids; empty: row numbers."""
    split: str = "train"
    """With task.name=hf:<source>: the split trained on (a single file or Dataset has one)."""
    eval_split: str = ""
    """With task.name=hf:<source>: the held-out split (e.g. 'test'); empty: task.eval_file, or
    a seeded fifth of the training rows (at most task.n_eval)."""
    subset: str = ""
    """With task.name=hf:<hub id>: the data set's configuration (load_dataset's `name`, e.g.
    'main' for gsm8k); empty: its default."""
    n_train: int = 4000
    """Number of generated training examples (generated tasks)."""
    n_eval: int = 200
    """Number of held-out examples used for accuracy."""
    seed: int = 1234
    """Seed of the task generator; the eval split uses a disjoint seed."""
    kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for the task generator (e.g. reasoning-gym config). For a
    reasoning-gym task taught by a scripted teacher, `slip` (default 0.6) is the teacher's
    slip probability and the rest go to reasoning-gym."""
    teacher: str = "auto"
    """Demonstrations for reasoning-gym tasks: 'auto' (the scripted CoT teacher of
    `longrl.data.teachers` where the family has one: chain_sum, simple_equations; bare
    answers otherwise) or 'none' (always bare `<answer>` demonstrations)."""


@dataclass
class RewardConfig:
    correctness: str = "auto"
    """Answer check: 'auto' (the task's own verifier), 'exact', 'normalized', 'math', 'mcq',
    'code' (run the answer as a Python program in a sandbox - bubblewrap where installed,
    weaker isolation announced - that returns the values of the tests' expressions, compared
    in the trainer; reward = fraction passed; `longrl.rewards.code`) or 'judge' (a local model
    rates the answer: reward.judge_model)."""
    extract: str = "auto"
    """How the answer the verifier checks is read out of a response: 'tags' (the
    `<answer>...</answer>` block), 'boxed' (the last `\\boxed{...}`, nested braces kept),
    'last_number' (the last number written), 'math_verify' (math_verify's own extraction from
    the whole response) or 'auto': the tags when the response holds an answer tag, else a
    `\\boxed{}` answer, never a guessed number (the tiny default, taught the tags, scores as with
    'tags': identical on the default run's checkpoints). For instruct models that do not write
    tags pick the form and ask for it in model.system_prompt. Every answer verifier and a task's own scorer use it; the format
    reward always reads the tags; 'code' and 'judge' read the `<answer>` block."""
    correctness_weight: float = 1.0
    """Weight of the correctness reward."""
    judge_model: str = ""
    """With reward.correctness=judge: a local Hugging Face causal LM that rates each answer
    against the reference; reward = its p(yes) / (p(yes) + p(no)) (`longrl.rewards.judge`)."""
    judge_template: str = ""
    """The judge's question, with {question}, {reference} and {response}; empty: the default."""
    format_weight: float = 0.1
    """Weight of the format reward (<think>...</think><answer>...</answer>); in multi-turn
    episodes the mean over turns of each turn's format (a well-formed tool call, or the
    answer template on the final turn)."""
    search_penalty: float = 0.0
    """Multi-turn episodes (MMSearch-R1's search penalty): a correct answer that used the
    search tool earns (1 - this) of the correctness reward, so searching pays only where the
    model could not answer without."""
    tool_error_penalty: float = 0.0
    """Multi-turn episodes: subtracted per failed tool call (malformed, unknown tool, error,
    timeout), at most 1 in all."""


@dataclass
class ToolsConfig:
    """Tools the model may call in multi-turn episodes (`tools/`; needs rollout.max_turns >= 2)."""

    enabled: list[str] = field(default_factory=list)
    """Tools offered: any of 'search' (BM25 over tools.search_corpus, or the task's own corpus),
    'python' (the code reward's sandbox) and, on video tasks, 'video_frames' (look again at
    seconds start-end of the video at tools.video_fps). Empty: single-turn rollouts."""
    format: str = "auto"
    """Tool-call format: 'tags' (`<call>name: args</call>` -> `<result>...</result>`; the tiny
    model gets one token per tag), 'hermes' (Qwen's `<tool_call>{json}</tool_call>`), or
    'auto': hermes where the tokenizer has `</tool_call>` as one token, else tags."""
    search_corpus: str = ""
    """JSONL of {"text": ...} documents for 'search' (empty: the task's corpus, e.g. 'facts')."""
    search_top_k: int = 1
    """Passages one search returns."""
    timeout: float = 10.0
    """Seconds a tool call may take before it returns an error result."""
    max_result_chars: int = 2000
    """Longer tool results are cut here (counted: agent/truncated_results)."""
    python_timeout: float = 5.0
    """Seconds of CPU/wall for one 'python' call inside the sandbox."""
    video_fps: float = 4.0
    """Frames per second at which 'video_frames' decodes the segment it is asked for (the
    frames' size follows video.max_pixels)."""
    video_max_frames: int = 8
    """Most frames one 'video_frames' call returns (a longer segment is sampled uniformly);
    each costs video tokens in the context (counted in rollout.max_new_tokens)."""


@dataclass
class SFTConfig:
    steps: int = 1000
    """Optimizer steps of chain-of-thought SFT before RL (0 skips SFT). Enough for the tiny
    model to converge on `addition` whatever the seed; there it imitates an imperfect teacher
    that often forgets carries (`addition`'s `slip`), so its greedy answers are right on about
    the carry-free 30% of sums and RL has room."""
    batch_size: int = 32
    """Demonstrations per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 30
    """Linear LR warm-up steps."""


@dataclass
class RolloutConfig:
    backend: str = "hf"
    """Generation engine: 'hf' (built-in batched KV-cache loop; text and video), 'continuous'
    (built-in continuous batching, the engine APRIL uses; text) or 'vllm' (the `vllm` extra:
    colocated vLLM engine, weights synced after every step; text, and video as cached embeddings
    where vLLM's Qwen2.5-VL imports: see rollout/vllm.py). With rollout.partial=true,
    'hf' means 'continuous'."""
    max_new_tokens: int = 0
    """Longest response in tokens; longer ones are truncated (and counted). 0 (the default):
    derived from the task's SFT demonstrations at the start of the run (`response_budget`: their
    99th-percentile token length plus max(8, 10%), at least 48), reported in one line and
    written to the run's config.yaml."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    slots: int = 0
    """Decoding slots of the continuous-batching engine used by APRIL (0: prompts_per_step *
    group_size)."""
    partial: bool = False
    """APRIL partial rollouts: over-provision, stop at the target, park the unfinished."""
    over_provision: float = 2.0
    """APRIL: launch this many times the target number of groups (with rollout.partial)."""
    max_staleness: int = 4
    """APRIL: drop parked samples older than this many policy versions."""
    offpolicy: str = "recompute"
    """APRIL off-policy handling: 'recompute', 'mask' or 'tis'."""
    tis_clip: float = 2.0
    """Truncated importance-sampling cap (rollout.offpolicy=tis)."""
    mismatch_threshold: float = 0.0
    """Drop from the loss every response whose mean |behaviour - trainer| log-prob gap per
    token exceeds this (engine/trainer mismatch, e.g. vLLM's kernels vs the trainer's);
    0 = off. The step's normaliser is unchanged; the dropped fraction is logged
    (`rollout/mismatch_masked_frac`)."""
    max_turns: int = 1
    """Model turns per episode (multi-turn tool use, `tools.enabled`): a turn that calls a
    tool gets the result appended and another turn, up to this many (`rollout/episodes.py`)."""
    max_turn_tokens: int = 0
    """Most tokens of one model turn (0: no cap but the total). rollout.max_new_tokens is
    the total of an episode's response, model and tool tokens together."""
    vllm_gpu_memory: float = 0.5
    """rollout.backend=vllm on a GPU: fraction of its memory vLLM may take for weights and
    KV cache (the trainer shares the device). On a CPU the KV cache size comes from the
    VLLM_CPU_KVCACHE_SPACE environment variable (GiB; longrl sets 1 when unset)."""


@dataclass
class RLConfig:
    steps: int = 120
    """Most GRPO steps (each: rollout, reward, advantages, PPO epochs, weight sync). With
    rl.stop_when_flat (the default) the run may end sooner, at a window's end, once neither its
    training reward nor its held-out accuracy still rises; with rl.stop_when_flat=false it runs
    exactly this many."""
    stop_when_flat: bool = True
    """End RL early once it has stopped improving (`recipes.common.reward_plateau`): at the end
    of every 20-step window from step 40 on, the run stops when neither the training reward
    (the mean of the window's last 10 steps) nor the held-out accuracy (evaluated there) is at
    least 0.02 above its best earlier value; a line says so, and summary.json's rl_steps and
    rl_stop say where and why. A task that keeps improving runs on to rl.steps; runs shorter
    than 40 steps never stop early."""
    algorithm: str = "grpo"
    """'grpo' (group advantages, PPO-clip or GSPO) or 'dpo': online DPO on verifier-labelled
    pairs, the best and the worst of each group's G samples when their rewards differ,
    against the frozen post-SFT policy (`rl.dpo_beta`; `recipes/dpo.py`)."""
    dpo_beta: float = 0.1
    """DPO's beta: how far the policy may move from the reference (with rl.algorithm=dpo)."""
    dpo_source: str = "online"
    """Where DPO's pairs come from: 'online' (the policy's samples, labelled by the verifier) or
    'data' (each training line's "chosen" and "rejected" responses, e.g. a JSONL task)."""
    prompts_per_step: int = 16
    """Prompts (groups) per step."""
    group_size: int = 8
    """Samples per prompt (G)."""
    advantage: str = "grpo"
    """'grpo' (mean/std within group), 'drgrpo' (no std division) or 'rloo'."""
    loss: str = "ppo"
    """Policy loss: 'ppo' (token-level clipped ratio) or 'gspo' (sequence-level ratio)."""
    clip_low: float = 0.2
    """Lower clip: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """Upper clip: ratio <= 1 + clip_high (DAPO clip-higher)."""
    loss_agg: str = "token-mean"
    """'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum'."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen reference (0 = off, no reference model)."""
    kl_estimator: str = "k3"
    """KL estimator: 'k1', 'k2' or 'k3'."""
    ppo_epochs: int = 1
    """Passes over each step's rollouts."""
    micro_batch_size: int = 64
    """Sequences per forward/backward; gradients accumulate to one optimizer step."""
    lr: float = 0.0
    """Peak learning rate (AdamW). Far below SFT's: one update per rollout batch has no
    trust region (the ratio is 1), and Adam turns noisy policy gradients into full-size steps.
    0 (the default): by the model (`rl_lr`): 5e-5 for a model built from scratch (the tiny
    default, after its SFT), 1e-5 for a checkpoint given by model.path (what SmolLM2-135M
    needed); reported in one line and written to the run's config.yaml."""
    warmup_steps: int = 5
    """Linear LR warm-up steps."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and refill."""
    max_refill_rounds: int = 3
    """Dynamic sampling: extra rollout rounds before training on what there is."""
    overlong: str = "none"
    """Overlong handling: 'none', 'filter' (mask truncated) or 'soft' (DAPO soft punishment)."""
    overlong_buffer: int = 8
    """Soft punishment ramps over the last this-many tokens before max_new_tokens."""
    dpo_rounds: int = 1
    """Multi-round DPO with LoRA (rl.algorithm=dpo, model.lora.r > 0; video-SALMONN 2): the
    rl.steps are split into this many rounds of equal length; each round trains a fresh
    adapter on pairs sampled from the current policy, against that round's starting model
    as the reference, and merges it into the base at the round's end."""
    eval_every: int = -1
    """Held-out accuracy every this many RL steps (0 = only at the end); -1 (the default): a
    third of rl.steps, rounded up, so a run of any length has held-out points at a third, two
    thirds and the end; 20 when rl.stop_when_flat may end the run early (rl.steps >= 40), one
    at every point where it may stop (`eval_cadence`)."""


@dataclass
class TrainConfig:
    backprop: str = "chunked"
    """'standard' (full [B, T, V] logits; for comparison), 'chunked' (log-probs chunk by
    chunk, no full logits; ordinary backward through the layers), 'checkpoint' (chunked +
    activation checkpointing) or 'streambp' (chunked + sequence-chunked layer backward:
    activation memory independent of sequence length; for long sequences)."""
    stream_chunk: int = 256
    """Sequence chunk (tokens) for chunked log-probs and the StreamBP layer backward."""
    pass_tokens: int = 512
    """Most positions (rows x padded length) one forward holds at a time: a text micro-batch
    of more runs in groups of similar-length rows, each cut to its own width (log-prob passes;
    with backprop=chunked also the training pass, exact, its activations bounded by this;
    `streambp.logprobs.row_groups_backward`); a longer row runs alone. 512 keeps a CPU's
    matmuls at full speed; raise it on a GPU. 0: the whole micro-batch in one forward."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed for model init, sampling and data order."""
    threads: int = 1
    """CPU threads for torch (0 = torch's default). Tiny models run fastest on one thread:
    their matmuls are too small to split, and extra threads only add contention."""
    dtype: str = "float32"
    """Compute dtype of the forward/backward passes: 'float32', or 'bfloat16' (also 'bf16')
    for mixed precision: the decoder layers' linear projections run in bf16 (autocast)
    while the weights, gradients and optimizer state stay in `model.dtype` (which must then
    be float32: the master weights), and attention, norms, the LM head, log-probs and
    losses stay in fp32
    (`longrl.models.precision`). `model.dtype` is the storage dtype of the weights themselves."""


@dataclass
class EvalConfig:
    max_new_tokens: int = 0
    """Generation budget for evaluation (greedy); 0 (the default): derived from the task's
    demonstrations as rollout.max_new_tokens is (`response_budget`)."""
    batch_size: int = 100
    """Prompts per generation batch."""


@dataclass
class RunConfig:
    name: str = ""
    """Run directory name under run.out_dir (empty: a timestamp)."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    save_every: int = 50
    """Checkpoint every this many RL steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Keep only the newest this-many checkpoints."""
    progress: bool = True
    """Show progress bars (on a terminal; otherwise, or when false, plain log lines every
    `run.log_every` steps)."""
    log_every: int = 10
    """Print one plain log line every this many steps when there is no progress bar (stderr
    is not a terminal, or run.progress=false); 0: never."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also receive every metric, the config and sample responses:
    any of 'tensorboard', 'wandb', 'mlflow' (a list, or one comma-separated string), each
    from its pip extra (`pip install -e ".[tensorboard]"`). All write under the run
    directory and need no network: W&B runs offline unless WANDB_MODE says otherwise,
    MLflow uses a file store unless MLFLOW_TRACKING_URI is set. Main rank only."""
    overwrite: bool = False
    """Replace an existing run directory of the same name (its checkpoints, metrics and
    summary are deleted first). Without it a non-empty run directory is refused."""


@dataclass
class VideoConfig:
    """Video-language training (tasks whose examples carry video media)."""

    fps: float = 0.0
    """Sample frames at this rate (0: `max_frames` frames spread uniformly over the video)."""
    max_frames: int = 16
    """Most frames taken from one video."""
    max_pixels: int = 64 * 64
    """Pixel budget per frame; larger frames are resized down keeping the aspect ratio."""
    embed_cache_dir: str = ""
    """Directory for a disk cache of video embeddings, kept across runs (empty: in memory
    only, for the run). Only valid with a frozen vision tower (`video.train_vision=false`),
    whose embeddings are computed once per video per run either way."""
    train_vision: bool = False
    """Also train the vision tower (then embeddings cannot be cached across steps)."""
    encode_chunk: int = 256
    """Frames the vision tower encodes at a time (rounded down to whole temporal patches;
    0: the whole video at once). Bounds the tower's activations for long videos; the
    embeddings are the same (the tower attends within one temporal step only)."""
    token_reduction: str = "none"
    """Drop redundant video tokens before the language model (`media/reduce.py`): 'none',
    or 'diff' (TimeChat-Online's differential dropping: a token whose cosine distance to
    the last kept token of the same patch is at most `drop_threshold` is dropped; the rest
    keep their true M-RoPE positions). Rollouts and training see the same reduced
    sequence, cached with the embeddings. Needs a frozen tower (`train_vision=false`)."""
    drop_threshold: float = 0.05
    """Cosine distance at or below which `token_reduction=diff` drops a token (0 drops
    only exact repeats)."""
    max_unseen: int = 0
    """With token_reduction=diff: a patch is dropped for at most this many temporal steps in
    a row; the next step keeps it whatever the threshold says (a codec's keyframe refresh,
    `media/reduce.py`); 0 (default): no limit, the threshold alone (an hour-long still video
    then keeps ~0.1%). With proportional attention the threshold alone kept the example
    task's RL gain at 32 frames (27% of the tokens kept; BENCHMARKS.md); without it, it did
    not, and a refresh of 1 (58% kept) was the closest."""
    proportional_attention: bool = True
    """With token_reduction=diff: each kept token's attention logits as a key get + log(the
    number of unreduced tokens it stands for), so a patch keeps about the attention mass of
    its dropped copies (ToMe's proportional attention; `media/reduce.py`). The bias rides in
    one more attention head dimension (`models/key_bias.py`: no [T, T] mask)."""


@dataclass
class ParallelConfig:
    """Sequence parallelism inside a torchrun job (data parallelism is the rest of the world)."""

    sp_size: int = 1
    """Ranks that share one sequence (Ulysses all-to-all around attention). The world size
    must be a multiple of it; world / sp_size groups of consecutive ranks run data parallel.
    Needs torchrun, train.backprop=chunked or checkpoint, and a text model whose attention
    heads it divides."""
    zero_optimizer: bool = False
    """Shard AdamW's moments over the ranks (ZeRO stage 1, torch's ZeroRedundancyOptimizer):
    optimizer memory per rank / world, the same updates. Only under torchrun; weights and
    gradients stay replicated."""
    fsdp: bool = False
    """FSDP2 (torch's fully_shard, each decoder layer and the root) over the data-parallel
    ranks: weights, gradients and AdamW state sharded 1/P per rank, gathered once per step
    for rollouts and the training passes (see longrl/parallel/fsdp.py for what that costs);
    DCP sharded checkpoints. Needs torchrun (--nproc-per-node 1 also runs); replaces
    zero_optimizer (the pair is refused); text models only."""
    fsdp_offload: bool = False
    """With fsdp: keep the shards and the optimizer step in host memory (FSDP's
    CPUOffloadPolicy); frees accelerator memory, changes nothing on a CPU-only machine."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    resume: str = ""
    """Run directory to continue from its last checkpoint (model, optimizer, RNG, data, step)."""

    def validate(self) -> "Config":
        """Check choices and cross-field constraints; raise UserError naming the key."""
        from longrl.tracking import check_report_to  # light: the trackers themselves are imported when used

        self.run.report_to = check_report_to(self.run.report_to)
        if self.run.log_every < 0:
            raise UserError(f"run.log_every={self.run.log_every} must be >= 0 (0: no plain log lines)")
        if self.train.pass_tokens < 0:
            raise UserError(f"train.pass_tokens={self.train.pass_tokens} must be >= 0 (0: a micro-batch in one forward)")
        check_survivable(self)
        _choice("model.dtype", self.model.dtype, ["float32", "bfloat16", "float16"])
        _choice("model.arch", self.model.arch, ["qwen2", "gla"])
        _check_lora_and_precision(self)
        if self.model.arch == "gla" and not self.model.path:
            if self.train.backprop == "streambp":
                raise UserError("train.backprop=streambp re-runs Hugging Face softmax-attention layers chunk by chunk; "
                                "model.arch=gla has none: use train.backprop=chunked (or checkpoint)")
            for key, value in [("model.gla.chunk_size", self.model.gla.chunk_size), ("model.gla.window", self.model.gla.window)]:
                if value < 1:
                    raise UserError(f"{key}={value} must be at least 1")
        _choice("rl.algorithm", self.rl.algorithm, ["grpo", "dpo"])
        if self.rl.algorithm == "dpo":
            _choice("rl.dpo_source", self.rl.dpo_source, ["online", "data"])
            if self.rl.dpo_beta <= 0:
                raise UserError(f"rl.dpo_beta={self.rl.dpo_beta} must be positive")
            if self.rollout.partial:
                raise UserError("rl.algorithm=dpo samples its pairs synchronously; set rollout.partial=false")
        _choice("rl.advantage", self.rl.advantage, ["grpo", "drgrpo", "rloo"])
        _choice("rl.loss", self.rl.loss, ["ppo", "gspo"])
        _choice("rl.loss_agg", self.rl.loss_agg, ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
        _choice("rl.kl_estimator", self.rl.kl_estimator, ["k1", "k2", "k3"])
        _choice("rl.overlong", self.rl.overlong, ["none", "filter", "soft"])
        _choice("rollout.offpolicy", self.rollout.offpolicy, ["recompute", "mask", "tis"])
        _choice("rollout.backend", self.rollout.backend, ["hf", "continuous", "vllm"])
        _choice("train.backprop", self.train.backprop, ["standard", "chunked", "checkpoint", "streambp"])
        _choice("reward.correctness", self.reward.correctness, ["auto", "exact", "normalized", "math", "mcq", "code", "judge"])
        _choice("reward.extract", self.reward.extract, ["auto", "tags", "boxed", "last_number", "math_verify"])
        if self.reward.extract not in ("auto", "tags") and self.reward.correctness in ("code", "judge"):
            raise UserError(f"reward.extract={self.reward.extract} reads answers for the answer verifiers; "
                            f"reward.correctness={self.reward.correctness} reads the <answer> block: drop reward.extract")
        if self.reward.correctness == "judge" and not self.reward.judge_model:
            raise UserError("reward.correctness=judge needs reward.judge_model=PATH (a local Hugging Face model directory)")
        for key, value in [
            ("rl.group_size", self.rl.group_size),
            ("rl.prompts_per_step", self.rl.prompts_per_step),
            ("rl.micro_batch_size", self.rl.micro_batch_size),
            ("rl.ppo_epochs", self.rl.ppo_epochs),
            ("train.stream_chunk", self.train.stream_chunk),
            ("task.n_eval", self.task.n_eval),
            ("eval.batch_size", self.eval.batch_size),
            ("sft.batch_size", self.sft.batch_size),
            ("video.max_frames", self.video.max_frames),
            ("video.max_pixels", self.video.max_pixels),
            ("parallel.sp_size", self.parallel.sp_size),
        ]:
            if value < 1:
                raise UserError(f"{key}={value} must be at least 1")
        if self.rl.group_size < 2 and self.rl.steps > 0:
            raise UserError(f"rl.group_size={self.rl.group_size}: group-relative advantages need at least 2 samples per prompt")
        if self.rollout.over_provision < 1.0:
            raise UserError(f"rollout.over_provision={self.rollout.over_provision} must be >= 1.0")
        if not 0.0 < self.rollout.top_p <= 1.0:
            raise UserError(f"rollout.top_p={self.rollout.top_p} must be in (0, 1]")
        if self.rollout.temperature < 0:
            raise UserError(f"rollout.temperature={self.rollout.temperature} must be >= 0")
        if self.rollout.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise UserError("rollout.backend=vllm needs vLLM: pip install -e \".[vllm]\" (see README), or use rollout.backend=hf")
        if self.task.name == "videos":
            _check_video_backend(self)
        _check_video(self.video)
        if self.video.train_vision and self.video.embed_cache_dir:
            raise UserError("video.embed_cache_dir needs a frozen vision tower; set video.train_vision=false or video.embed_cache_dir=''")
        if self.task.name == "jsonl" and not self.task.train_file:
            raise UserError("task.name=jsonl needs task.train_file=PATH (a JSONL of {\"prompt\", \"answer\"} lines)")
        _check_fsdp(self.parallel, self.task.name, self.rollout.backend)
        _check_tools(self)
        return self


def _check_tools(cfg: "Config") -> None:
    """Multi-turn tool use: the keys' ranges and what it does not combine with yet."""
    t = cfg.tools
    if isinstance(t.enabled, str):
        t.enabled = [s.strip() for s in t.enabled.split(",") if s.strip()]
    for name in t.enabled:
        if ":" not in name:  # 'file.py:Class' / 'module:Class' is a user's tool, loaded with the run
            _choice("tools.enabled", name, ["search", "python", "video_frames"])
    _choice("tools.format", t.format, ["auto", "tags", "hermes"])
    if cfg.rollout.max_turns < 1 or cfg.rollout.max_turn_tokens < 0:
        raise UserError(f"rollout.max_turns={cfg.rollout.max_turns} must be >= 1 and rollout.max_turn_tokens="
                        f"{cfg.rollout.max_turn_tokens} >= 0 (0: no per-turn cap)")
    if t.enabled and cfg.rollout.max_turns < 2:
        raise UserError(f"tools.enabled={','.join(t.enabled)} needs rollout.max_turns >= 2 (a turn for the call, "
                        "one for the answer)")
    if cfg.rollout.max_turns > 1 and not t.enabled:
        raise UserError(f"rollout.max_turns={cfg.rollout.max_turns}: a turn ends only by calling a tool; set "
                        "tools.enabled (search, python) or rollout.max_turns=1")
    for key, value in [("tools.search_top_k", t.search_top_k), ("tools.timeout", t.timeout),
                       ("tools.max_result_chars", t.max_result_chars), ("tools.python_timeout", t.python_timeout),
                       ("tools.video_fps", t.video_fps), ("tools.video_max_frames", t.video_max_frames)]:
        if value <= 0:
            raise UserError(f"{key}={value} must be positive")
    if not 0.0 <= cfg.reward.search_penalty <= 1.0 or cfg.reward.tool_error_penalty < 0:
        raise UserError(f"reward.search_penalty={cfg.reward.search_penalty} must be in [0, 1] and "
                        f"reward.tool_error_penalty={cfg.reward.tool_error_penalty} >= 0")
    _check_video_tools(cfg)
    if t.enabled and cfg.rl.algorithm == "dpo":
        raise UserError("tools.enabled: multi-turn episodes train with rl.algorithm=grpo (DPO pairs of episodes are not built)")


def _check_video_tools(cfg: "Config") -> None:
    """Tools on video tasks: 'video_frames' only (and only there), on the settings its
    segments support."""
    t, videos = cfg.tools, cfg.task.name == "videos"
    if "video_frames" in t.enabled and not videos:
        raise UserError("tools.enabled=video_frames needs a video task (task.name=videos)")
    if not videos or not t.enabled:
        return
    if t.enabled != ["video_frames"]:
        raise UserError(f"tools.enabled={','.join(t.enabled)}: a video task's episodes offer video_frames only")
    if cfg.video.token_reduction != "none":
        raise UserError("tools.enabled=video_frames with video.token_reduction=diff is not supported; set "
                        "video.token_reduction=none")
    if cfg.parallel.sp_size > 1 or cfg.rollout.backend != "hf":
        raise UserError("tools.enabled=video_frames runs on rollout.backend=hf with parallel.sp_size=1")


def _check_video(v: VideoConfig) -> None:
    """The video keys' ranges and what token reduction does not combine with."""
    _choice("video.token_reduction", v.token_reduction, ["none", "diff"])
    if v.max_unseen < 0:
        raise UserError(f"video.max_unseen={v.max_unseen} must be >= 0 (0: no limit, the threshold alone)")
    if not 0.0 <= v.drop_threshold <= 2.0:
        raise UserError(f"video.drop_threshold={v.drop_threshold} must be a cosine distance in [0, 2]")
    if v.encode_chunk < 0:
        raise UserError(f"video.encode_chunk={v.encode_chunk} must be >= 0 (0: the whole video at once)")
    if v.train_vision and v.token_reduction != "none":
        raise UserError("video.token_reduction needs a frozen vision tower (the kept tokens would change every step); "
                        "set video.train_vision=false or video.token_reduction=none")


def _check_video_backend(cfg: "Config") -> None:
    """Video rollouts: the batched native backend, or vLLM fed MR-SP's cached embeddings
    (rollout/vllm.py; not the continuous engine, APRIL, SP or token reduction)."""
    r = cfg.rollout
    if r.backend == "continuous":
        raise UserError("rollout.backend=continuous: video rollouts run on rollout.backend=hf (batched) or "
                        "rollout.backend=vllm; the continuous engine takes token-only prompts")
    if r.backend != "vllm":
        return
    for bad, fix in [(r.partial, "rollout.partial=false"), (cfg.parallel.sp_size > 1, "parallel.sp_size=1"),
                     (cfg.video.token_reduction != "none", "video.token_reduction=none")]:
        if bad:
            raise UserError(f"rollout.backend=vllm for video takes whole, unsharded videos without APRIL: set {fix} "
                            "(or rollout.backend=hf)")


def _check_fsdp(p: ParallelConfig, task_name: str, backend: str) -> None:
    """What parallel.fsdp does not combine with (the torchrun check is in parallel/fsdp.py)."""
    if p.fsdp_offload and not p.fsdp:
        raise UserError("parallel.fsdp_offload=true offloads FSDP2's shards; add parallel.fsdp=true")
    if not p.fsdp:
        return
    if p.zero_optimizer:
        raise UserError("parallel.fsdp=true already shards the optimizer state (and the weights and gradients); "
                        "drop parallel.zero_optimizer=true")


def _check_lora_and_precision(cfg: "Config") -> None:
    """model.lora, train.dtype and rl.dpo_rounds (normalises the aliases and the list)."""
    cfg.train.dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(cfg.train.dtype, cfg.train.dtype)
    _choice("train.dtype", cfg.train.dtype, ["float32", "bfloat16"])
    if cfg.train.dtype == "bfloat16" and cfg.model.dtype != "float32":
        raise UserError(f"train.dtype=bfloat16 keeps fp32 master weights, but model.dtype={cfg.model.dtype}: "
                        f"set model.dtype=float32 (or train.dtype=float32 to train in {cfg.model.dtype} itself)")
    lora = cfg.model.lora
    if isinstance(lora.target_modules, str):
        lora.target_modules = [t.strip() for t in lora.target_modules.split(",") if t.strip()]
    if not isinstance(lora.target_modules, list) or not lora.target_modules or not all(
            isinstance(t, str) and t for t in lora.target_modules):
        raise UserError(f"model.lora.target_modules={lora.target_modules!r} must be module names, e.g. "
                        "[q_proj, v_proj], 'q_proj,v_proj' or all-linear")
    sft = ("true" if lora.sft else "false") if isinstance(lora.sft, bool) else str(lora.sft).lower()
    lora.sft = {"yes": "true", "no": "false", "1": "true", "0": "false"}.get(sft, sft)  # YAML bool or CLI text
    _choice("model.lora.sft", lora.sft, ["auto", "true", "false"])
    if not lora.lr_scale > 0:
        raise UserError(f"model.lora.lr_scale={lora.lr_scale} must be positive (1: the phase's own learning rate)")
    if lora.r < 0 or lora.alpha <= 0 or not 0.0 <= lora.dropout < 1.0:
        raise UserError(f"model.lora: r={lora.r} must be >= 0 (0: off), alpha={lora.alpha} > 0 and "
                        f"dropout={lora.dropout} in [0, 1)")
    if cfg.rl.dpo_rounds < 1:
        raise UserError(f"rl.dpo_rounds={cfg.rl.dpo_rounds} must be at least 1")
    if cfg.rl.dpo_rounds > 1:
        if cfg.rl.algorithm != "dpo" or lora.r == 0:
            raise UserError(f"rl.dpo_rounds={cfg.rl.dpo_rounds}: multi-round DPO merges a LoRA adapter per round; "
                            "set rl.algorithm=dpo and model.lora.r > 0 (e.g. 16), or rl.dpo_rounds=1")
        if cfg.rl.steps % cfg.rl.dpo_rounds:
            raise UserError(f"rl.steps={cfg.rl.steps} must divide into rl.dpo_rounds={cfg.rl.dpo_rounds} rounds "
                            "of equal length")
    if lora.r == 0:
        return
    if importlib.util.find_spec("peft") is None:
        raise UserError('model.lora.r > 0 needs peft: pip install -e ".[lora]" (or pip install "peft>=0.13")')
    if cfg.task.name == "videos" and cfg.video.train_vision:  # the reference would see the policy's embeddings
        raise UserError("model.lora adapts the video model's language model and keeps the vision tower frozen; "
                        "drop video.train_vision=true (or train every weight with model.lora.r=0)")


def _choice(key: str, value: str, options: list[str]) -> None:
    if value not in options:
        near = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"{key}={value!r} is not one of {options}{hint}")


# ----------------------------------------------------------------------------------------
# Values a run cannot survive: refused at load time, before torch is imported or a file
# is written (each one used to fail minutes into a run, or to write outside run.out_dir).
# ----------------------------------------------------------------------------------------

MAX_GROUP_SIZE = 1024
"""Most samples per prompt. Published GRPO recipes use 4-64 (LongVILA-R1: 8, DAPO: 16); past
a few hundred the group mean and std no longer change and the step is all rollout. 1024
leaves an order of magnitude of room and refuses values whose first rollout cannot fit."""
MAX_ROWS_PER_STEP = 65536
"""Most sequences one step's rollout decodes together (prompts_per_step * group_size, times
rollout.over_provision with APRIL; or rollout.slots). Each holds its ids, log-probs and a
KV cache row of every layer: 65536 rows of the default tiny model's 1 KiB-per-token cache
at ~100 tokens are ~6 GiB, so the bound sits at what a large host holds for the smallest
model, not at what a GPU user asks for (P=1024 x G=64 fits)."""
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def check_survivable(cfg: "Config") -> None:
    """Refuse ranges no run survives: non-finite floats, non-positive sizes and rates,
    clips out of range, groups too large to roll out, devices that are not there, and a
    run.name that leaves run.out_dir."""
    _check_finite(cfg, "")
    _at_least(1, ("run.save_every", cfg.run.save_every),
              *((f"model.tiny.{k}", v) for k, v in dataclasses.asdict(cfg.model.tiny).items()))
    for key, value in (("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
                       ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if value < 0:
            raise UserError(f"{key}={value} must be at least 1 (or 0: derived from the task's demonstrations)")
    if cfg.rl.eval_every < -1:
        raise UserError(f"rl.eval_every={cfg.rl.eval_every} must be >= 0 (0: only at the end; -1: a third of rl.steps)")
    _at_least(0, ("sft.steps", cfg.sft.steps), ("rl.steps", cfg.rl.steps), ("sft.warmup_steps", cfg.sft.warmup_steps),
              ("rl.warmup_steps", cfg.rl.warmup_steps),
              ("run.keep_checkpoints", cfg.run.keep_checkpoints), ("rollout.slots", cfg.rollout.slots),
              ("rollout.max_staleness", cfg.rollout.max_staleness), ("rl.max_refill_rounds", cfg.rl.max_refill_rounds),
              ("rl.overlong_buffer", cfg.rl.overlong_buffer), ("train.threads", cfg.train.threads),
              ("task.n_train", cfg.task.n_train), ("model.gla.softmax_every", cfg.model.gla.softmax_every))
    for key, lr in (("sft.lr", cfg.sft.lr), ("rl.lr", cfg.rl.lr)):
        if lr < 0 or (lr == 0 and key == "sft.lr"):
            hint = " (or 0: chosen by the model, `rl_lr`)" if key == "rl.lr" else ""
            raise UserError(f"{key}={lr} must be positive{hint} (AdamW's peak learning rate, e.g. {key}=1e-4)")
    for key, value in (("rl.kl_coef", cfg.rl.kl_coef), ("train.grad_clip", cfg.train.grad_clip),
                       ("train.weight_decay", cfg.train.weight_decay), ("video.fps", cfg.video.fps)):
        if value < 0:
            raise UserError(f"{key}={value} must be >= 0 (0 turns it off)")
    if not 0 < cfg.rl.clip_low < 1:
        raise UserError(f"rl.clip_low={cfg.rl.clip_low} must be in (0, 1): the ratio is clipped below at 1 - clip_low")
    for key, value in (("rl.clip_high", cfg.rl.clip_high), ("rollout.tis_clip", cfg.rollout.tis_clip)):
        if value <= 0:
            raise UserError(f"{key}={value} must be positive")
    _check_tiny_shape(cfg)
    _check_rollout_size(cfg)
    _check_device(cfg.model.device)
    _check_run_name(cfg.run.name)


def _check_finite(obj: Any, prefix: str) -> None:
    """Every float field is finite: nan and inf parse as floats, and no knob here means them."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{prefix}{f.name}={value} is not a finite number; give a finite value")


def _at_least(low: int, *items: tuple[str, int]) -> None:
    for key, value in items:
        if value < low:
            raise UserError(f"{key}={value} must be at least {low}")


def _check_tiny_shape(cfg: "Config") -> None:
    """The built-in tiny model's heads: a whole, even width each (rotary embeddings rotate
    pairs of channels), and query heads in whole groups per key/value head."""
    if cfg.model.path:
        return
    t = cfg.model.tiny
    if t.hidden_size % t.num_heads or (t.hidden_size // t.num_heads) % 2:
        raise UserError(f"model.tiny.hidden_size={t.hidden_size} must divide by model.tiny.num_heads={t.num_heads} "
                        "into an even head width (e.g. hidden_size=128, num_heads=4)")
    if cfg.model.arch == "qwen2" and t.num_heads % t.num_kv_heads:
        raise UserError(f"model.tiny.num_heads={t.num_heads} must be a multiple of model.tiny.num_kv_heads={t.num_kv_heads}")


def _check_rollout_size(cfg: "Config") -> None:
    if cfg.rl.group_size > MAX_GROUP_SIZE:
        raise UserError(f"rl.group_size={cfg.rl.group_size} is more than {MAX_GROUP_SIZE} samples per prompt; "
                        "group statistics stop changing long before (recipes use 4-64): lower it")
    rows = cfg.rl.prompts_per_step * cfg.rl.group_size
    if cfg.rollout.partial:
        rows = math.ceil(rows * cfg.rollout.over_provision)
    for what, n, fix in (("rl.prompts_per_step * rl.group_size", rows, "rl.prompts_per_step or rl.group_size"),
                         ("rollout.slots", cfg.rollout.slots, "rollout.slots")):
        if n > MAX_ROWS_PER_STEP:
            raise UserError(f"{what} = {n} sequences decoded together is more than {MAX_ROWS_PER_STEP}, "
                            f"whose KV caches would not fit in memory: lower {fix}")


def _check_device(device: str) -> None:
    """'cuda' is refused when this machine shows no GPU: a cheap look at the driver's device
    nodes and CUDA_VISIBLE_DEVICES, so config errors never wait on importing torch."""
    if device in ("auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", device):
        near = difflib.get_close_matches(device, DEVICE_CHOICES, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"model.device={device!r} is not one of {list(DEVICE_CHOICES)}{hint}")
    if not gpu_visible():
        raise UserError(f"model.device={device}: no GPU is visible on this machine; use model.device=cpu "
                        "(or auto: the GPU when there is one)")


def gpu_visible() -> bool:
    """Whether a CUDA (or ROCm, which torch also calls 'cuda') GPU can be seen, without torch."""
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if os.environ.get(var, None) is not None and os.environ[var].strip() in ("", "-1"):
            return False
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def _check_run_name(name: str) -> None:
    """run.name is a directory inside run.out_dir: relative, no '..', no NUL."""
    parts = Path(name).parts
    if "\0" in name or Path(name).is_absolute() or ".." in parts or (name and not parts):
        raise UserError(f"run.name={name!r} must be a plain directory name inside run.out_dir "
                        "(no '..', not an absolute path); put the location in run.out_dir instead")


# ----------------------------------------------------------------------------------------
# Plumbing: YAML + key=value overrides onto the dataclass tree.
# ----------------------------------------------------------------------------------------


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], key + "."))
    return keys


def _unknown_key(key: str) -> UserError:
    near = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else "; `longrl train --help` lists the keys"
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise UserError."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif origin in (typing.Union, types.UnionType):
        return value
    else:
        return value
    name = getattr(typ, "__name__", str(typ))
    raise UserError(f"config key '{key}' expects {name}, got {value!r}")


def _apply(obj: Any, key: str, value: Any, prefix: str = "") -> None:
    """Set dotted `key` on the dataclass tree `obj`."""
    head, _, rest = key.partition(".")
    full = f"{prefix}{head}"
    hints = typing.get_type_hints(type(obj))
    if head not in hints or head not in {f.name for f in dataclasses.fields(obj)}:
        raise _unknown_key(prefix + key)
    typ = hints[head]
    if rest:
        if not dataclasses.is_dataclass(typ):
            if typ is dict or typing.get_origin(typ) is dict:
                getattr(obj, head)[rest] = value
                return
            raise _unknown_key(prefix + key)
        _apply(getattr(obj, head), rest, value, full + ".")
    elif dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise UserError(f"config key '{full}' is a section; give its fields (e.g. {full}.<field>=...)")
        for k, v in value.items():
            _apply(getattr(obj, head), str(k), v, full + ".")
    else:
        setattr(obj, head, _coerce(full, value, typ))


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


EVAL_ALIASES = {"model": "model.path", "task": "task.name"}
"""`longrl eval model=... task=...`: short names for the two keys an evaluation always sets."""


def eval_overrides(overrides) -> list[str]:
    """`longrl eval`'s key=value items with its short names expanded (EVAL_ALIASES)."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        out.append(f"{EVAL_ALIASES.get(key.strip(), key.strip())}{sep}{value}" if sep else item)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then validate."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' not found; pass an existing YAML file to --config")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"config file '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file '{path}' is not valid YAML: {e}".splitlines()[0])
        if not isinstance(data, dict):
            raise UserError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
        for k, v in data.items():
            _apply(cfg, str(k), v)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value (e.g. rl.group_size=8)")
        k, _, v = item.partition("=")
        _apply(cfg, k.strip(), _parse_value(v.strip()))
    return cfg.validate()


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    for k, v in data.items():
        _apply(cfg, k, v)
    return cfg.validate()


def describe_keys() -> str:
    """Every key with its default and doc line, for --help."""
    lines = []

    def walk(cls, obj, prefix):
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            val = getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], val, f"{prefix}{f.name}.")
            else:
                doc = docs.get(f.name, "")
                lines.append(f"  {prefix}{f.name}={val!r}  {doc}")

    walk(Config, Config(), "")
    return "\n".join(lines)


def _field_docs(cls) -> dict[str, str]:
    """Read the string literal after each field (the attribute docstring) from source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, last = {}, None
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif last and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant):
            docs[last] = " ".join(str(node.value.value).split())
            last = None
    return docs


# ----------------------------------------------------------------------------------------
# Derived values: computed here and nowhere else.
# ----------------------------------------------------------------------------------------


def rollout_backend_name(cfg: Config) -> str:
    """The backend that runs: APRIL (rollout.partial) needs submit/step/abort, which the
    batched 'hf' loop does not have, so 'hf' with rollout.partial=true is 'continuous'."""
    if cfg.rollout.partial and cfg.rollout.backend == "hf":
        return "continuous"
    return cfg.rollout.backend


def rollout_slots(cfg: Config) -> int:
    """Decoding slots of a continuous engine: rollout.slots, or one per sample of this
    replica's groups (rollout.slots=0)."""
    if cfg.rollout.slots:
        return cfg.rollout.slots
    from longrl.parallel import dist

    lay = dist.layout()
    return max(1, len(dist.shard_indices(cfg.rl.prompts_per_step, lay.dp_rank, lay.dp_size))) * cfg.rl.group_size


def train_temperature(cfg: Config) -> float:
    """Temperature of the trainer's log-probs: the rollouts' (so behaviour and trainer
    log-probs are of one distribution), or 1 when rollouts are greedy (temperature 0)."""
    return cfg.rollout.temperature or 1.0


def dpo_pairs_per_micro(cfg: Config) -> int:
    """DPO micro-batches hold whole pairs: rl.micro_batch_size // 2 pairs (at least one)."""
    return max(1, cfg.rl.micro_batch_size // 2)


BUDGET_FLOOR = 48
"""The smallest derived response budget: the budget the default task (`addition`, whose
demonstrations are at most 33 tokens with EOS) always had, so its runs are unchanged."""
BUDGET_QUANTILE = 0.99
"""Demonstration length (nearest rank) a derived budget covers before its margin: the longest
1% are outliers a budget need not be sized by."""


def response_budget(lengths: list[int]) -> int:
    """A response budget that fits demonstrations of these token lengths (EOS counted):
    their `BUDGET_QUANTILE` length by nearest rank, plus max(8, 10%) tokens of margin for
    samples a little longer than what they imitate, at least `BUDGET_FLOOR`. No lengths
    (no demonstrations): `BUDGET_FLOOR`.

    E.g. rg:chain_sum with 3 terms on the tiny tokenizer: p99 102 -> 102 + 11 = 113 (the fixed
    48 cut 35% of its demonstrations); `addition`: p99 33 -> 41 -> the floor, 48."""
    if not lengths:
        return BUDGET_FLOOR
    ordered = sorted(lengths)
    q = ordered[math.ceil(BUDGET_QUANTILE * len(ordered)) - 1]
    return max(BUDGET_FLOOR, q + max(8, math.ceil(0.1 * q)))


def resolve_response_budgets(cfg: Config, lengths: list[int], sections: tuple[str, ...] = ("rollout", "eval")) -> str | None:
    """Set the `sections`' max_new_tokens (rollout, eval) that are 0 ('derive') to
    `response_budget(lengths)` (the demonstrations' token lengths), in place; returns the one
    line a run reports at its start, or None when all were set."""
    unset = [k for k in sections if getattr(cfg, k).max_new_tokens == 0]
    if not unset:
        return None
    budget = response_budget(lengths)
    for section in unset:
        getattr(cfg, section).max_new_tokens = budget
    where = " and ".join(f"{s}.max_new_tokens" for s in unset)
    if not lengths:
        return f"longrl: {where} = {budget} (no demonstrations to size it by: the floor)"
    q = sorted(lengths)[math.ceil(BUDGET_QUANTILE * len(lengths)) - 1]
    return (f"longrl: {where} = {budget} tokens, derived from {len(lengths)} demonstrations "
            f"(99th percentile {q}, longest {max(lengths)}, plus margin; floor {BUDGET_FLOOR}); set it to override")


PLATEAU_WINDOW = 20
"""rl.stop_when_flat: steps per window of the plateau rule (`recipes.common.reward_plateau`)."""
PLATEAU_DELTA = 0.02
"""rl.stop_when_flat: how much a window's late training reward, or the held-out accuracy at its
end, must beat its best earlier value to go on; about one standard error of the difference of
two 10-step means of 128 binary rewards (0.5 * sqrt(2 / 1280) = 0.020)."""


def eval_cadence(cfg: Config) -> int:
    """RL steps between held-out evaluations: rl.eval_every, or for -1 a third of rl.steps
    rounded up (at least 1), so every run has evaluations at about 1/3, 2/3 and its end; a run
    that rl.stop_when_flat may end early (>= 2 windows) evaluates at every window's end instead,
    where the rule reads the held-out accuracy."""
    if cfg.rl.eval_every >= 0:
        return cfg.rl.eval_every
    if cfg.rl.stop_when_flat and cfg.rl.steps >= 2 * PLATEAU_WINDOW:
        return PLATEAU_WINDOW
    return max(1, math.ceil(cfg.rl.steps / 3))


RL_LR_SCRATCH = 5e-5
"""rl.lr=0 on a model built from scratch: the rate the default run (`addition`) was tuned at."""
RL_LR_CHECKPOINT = 1e-5
"""rl.lr=0 on a checkpoint (model.path): what SmolLM2-135M-Instruct learned chain_sum at (its
example, BENCHMARKS.md); the scratch rate is 5x what a pretrained model's full fine-tuning takes."""


def rl_lr(cfg: Config) -> float:
    """The RL learning rate: rl.lr, or for 0 `RL_LR_CHECKPOINT` when model.path names a
    checkpoint and `RL_LR_SCRATCH` for the tiny model built from scratch."""
    if cfg.rl.lr > 0:
        return cfg.rl.lr
    return RL_LR_CHECKPOINT if cfg.model.path else RL_LR_SCRATCH


def resolve_rl_lr(cfg: Config) -> str | None:
    """Set rl.lr=0 to `rl_lr(cfg)` in place; the line a run reports at its start, or None when set."""
    if cfg.rl.lr > 0:
        return None
    cfg.rl.lr = rl_lr(cfg)
    kind = "a checkpoint (model.path)" if cfg.model.path else "a model built from scratch"
    return f"longrl: rl.lr = {cfg.rl.lr:g} for {kind}; set rl.lr to override"


def lora_sft(cfg: Config) -> bool:
    """SFT trains a LoRA adapter (model.lora.r > 0 and model.lora.sft true, or 'auto' with a
    pretrained checkpoint); otherwise SFT fine-tunes every weight."""
    setting = cfg.model.lora.sft
    return cfg.model.lora.r > 0 and (setting == "true" or (setting == "auto" and bool(cfg.model.path)))


def phase_lr(cfg: Config, lr: float, adapters: bool) -> float:
    """The learning rate a phase's optimizer uses: `lr` (sft.lr, rl.lr), times
    model.lora.lr_scale when the phase trains LoRA adapters."""
    return lr * cfg.model.lora.lr_scale if adapters else lr
