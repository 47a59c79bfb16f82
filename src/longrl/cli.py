"""`longrl train | eval | bench | export | models | data`: parse arguments, call a recipe. Nothing else lives here.

The config is loaded and validated before any recipe (so torch) is imported, and `eval
--out` is checked before the evaluation: bad input answers at once, with one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

from longrl.errors import UserError

BENCHES = {
    "grpo-step": "longrl.bench.grpo_step",
    "rollout": "longrl.bench.rollout",
    "rollout-backends": "longrl.bench.rollout_backends",
    "streambp": "longrl.bench.streambp",
    "allscan": "longrl.bench.allscan",
    "video-cache": "longrl.bench.video_cache",
    "zero": "longrl.bench.zero",
    "fsdp": "longrl.bench.fsdp",
    "long-video": "longrl.bench.long_video",
}
DATA = {"videos": "longrl.data.videos"}


def _train_help() -> str:
    from longrl.config import describe_keys

    return textwrap.dedent("""\
        Run CoT-SFT then GRPO. With no arguments: the built-in tiny model on the built-in
        'addition' task, on the CPU, in minutes. Writes runs/<name>/: config.yaml,
        metrics.jsonl, summary.json, curves.png, checkpoints/step_<N>/ (Hugging Face format).

        examples:
          longrl train
          longrl train rl.group_size=4 rl.steps=50 run.name=mine
          longrl train --config examples/grpo_tiny.yaml task.name=rg:chain_sum
          longrl train resume=runs/mine

        keys (key=default  meaning):
        """) + describe_keys()


def cmd_train(args) -> int:
    from longrl.config import load_config

    cfg = load_config(args.config, args.overrides)  # before torch: a bad value answers in a blink, not 30 s
    from longrl.recipes.train import train

    summary = train(cfg)
    from longrl.parallel import dist

    if dist.is_main():  # under torchrun every rank returns the summary; one prints it
        _print_summary(summary)
    return 0


def _print_summary(s: dict) -> None:
    rows = [("held-out accuracy, initial", s.get("accuracy_initial")),
            *([("held-out accuracy, after SFT", s["accuracy_after_sft"])] if s.get("sft_steps", 1) else []),
            ("held-out accuracy, after RL", s["accuracy_after_rl"]),
            ("RL gain", s["rl_gain"]),
            ("wall time (s)", s["wall_seconds"])]
    print("\n" + "-" * 44)
    for name, v in rows:
        print(f"{name:<32}{'-' if v is None else f'{v:>10.3f}'}")
    print("-" * 44)
    run = s["run_dir"]
    print(f"wrote {run}/config.yaml, metrics.jsonl, summary.json, curves.png")
    print(f"      {s['checkpoint']}  (Hugging Face format)")


def check_out_path(path: str | Path, directory: bool = False, flag: str = "--out") -> None:
    """Refuse, before an evaluation runs, a results path it could not write at the end: a
    directory where a file goes (or the reverse), a parent that is a file, or a place this
    process cannot create files in. Creates nothing (the probe is an unnamed temp file);
    missing parents are fine, the atomic writers make them."""
    p = Path(path)
    if directory and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file; give a directory for the per-question results")
    if not directory and p.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file path, e.g. {p / 'results.jsonl'}")
    parent = p if directory else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory; give a path under a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); give a writable location") from None


def cmd_eval(args) -> int:
    if args.out is not None:  # checked now: the results are written only after the whole evaluation
        check_out_path(args.out, directory=bool(args.videomme))
    if args.videomme:
        from longrl.eval.videomme import run_videomme, videomme_options

        if not args.videos:
            raise UserError("--videomme needs --videos DIR (the folder holding <video_id>.mp4 files)")
        if args.config:
            raise UserError("--config is for the task eval; --videomme takes its settings as key=value (model=PATH ...)")
        result = run_videomme(args.videomme, args.videos, out_dir=args.out, max_frames=args.max_frames,
                              **videomme_options(args.overrides))
        print(json.dumps(result, indent=2))
        return 0
    from longrl.config import eval_overrides, load_config

    load_config(args.config, eval_overrides(args.overrides))  # a typo answers before torch is imported
    from longrl.recipes.evaluate import run_eval

    result = run_eval(args.overrides, config=args.config, out=args.out)
    print(json.dumps(result, indent=2))
    return 0


def cmd_plan(args) -> int:
    """Peak memory per rank of one RL step, piece by piece (`longrl.plan`), and with
    --memory-gib the cheapest settings that fit."""
    from longrl.config import load_config

    cfg = load_config(args.config, args.overrides)  # before torch, as for `train`
    if args.memory_gib is not None and args.memory_gib <= 0:
        raise UserError(f"--memory-gib {args.memory_gib} must be positive (GiB per rank, e.g. --memory-gib 20)")
    if args.world_size is not None and args.world_size < 1:
        raise UserError(f"--world-size {args.world_size} must be at least 1")
    from longrl.plan import main as plan_main

    return plan_main(cfg, memory_gib=args.memory_gib, world_size=args.world_size, video_keep=args.video_keep,
                     prompt_tokens=args.prompt_tokens, as_json=args.json)


def cmd_bench(args) -> int:
    """Every benchmark's `run(argv) -> dict`; its own output goes to stderr as progress, and
    the JSON result is the only thing on stdout."""
    import contextlib
    import importlib

    mod = importlib.import_module(BENCHES[args.name])
    rest = [a for a in args.rest if a != "--json"]
    with contextlib.redirect_stdout(sys.stderr):
        result = mod.run(rest)
    print(json.dumps(result, indent=2) if args.json or "--json" in args.rest else _flat(result))
    return 0


def _flat(result: dict, prefix: str = "") -> str:
    """Human-readable key: value lines (nested keys joined with '.')."""
    lines = []
    for k, v in result.items():
        if isinstance(v, dict):
            lines.append(_flat(v, f"{prefix}{k}."))
        else:
            lines.append(f"{prefix}{k}: {v}")
    return "\n".join(lines)


def cmd_export(args) -> int:
    """A run's checkpoint (the newest verified one, or --step N) as a plain Hugging Face dir."""
    from longrl.checkpoint import MANIFEST_FILE, export_checkpoint, latest_checkpoint

    src = Path(args.run)
    check_out_path(args.out, directory=True)
    if args.step is not None:
        ckpt = src / "checkpoints" / f"step_{args.step}"
    elif (src / MANIFEST_FILE).is_file():  # a checkpoint directory itself
        ckpt = src
    else:
        ckpt = latest_checkpoint(src)
    if ckpt is None or not ckpt.is_dir():
        which = f"step_{args.step}" if args.step is not None else "with a verified manifest"
        raise UserError(f"{args.run}: no checkpoint {which} found; give a run directory (runs/<name>) "
                        f"or a checkpoint (runs/<name>/checkpoints/step_N)")
    out = export_checkpoint(ckpt, Path(args.out))
    print(f"exported {ckpt} to {out} (Hugging Face format: transformers loads it without longrl)")
    return 0


def cmd_models(args) -> int:
    """`models convert-gguf FILE --out DIR`: a GGUF checkpoint as a plain Hugging Face dir."""
    from longrl.models.gguf import convert_gguf

    out = convert_gguf(args.file, args.out)
    print(f"converted {args.file} to {out} (Hugging Face format, float32): use model.path={out}")
    return 0


def cmd_data(args) -> int:
    import importlib

    return importlib.import_module(DATA[args.generator]).main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longrl", description="RL post-training of language and video-language models on long sequences.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,plan,bench,export,models,data}")

    t = sub.add_parser("train", help="CoT-SFT then GRPO (default: tiny model, built-in task, CPU)",
                       description=_train_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML file of config keys (overridden by key=value)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rl.group_size=8")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="held-out accuracy of a model on a task",
                       description="Greedy accuracy of model=PATH (a Hugging Face directory or a run checkpoint) "
                                   "on task=NAME; same keys as `longrl train` (model.path, task.*, eval.*). "
                                   "Example: longrl eval model=runs/x/checkpoints/step_100 task=addition")
    e.add_argument("--config", help="YAML file of config keys")
    e.add_argument("--out", help="per-item results: a JSONL file (task eval) or a directory (--videomme)")
    e.add_argument("--videomme", metavar="ANNOT", help="Video-MME-format annotation file (JSON/JSONL/parquet); with "
                   "model=PATH (or model=tiny, untrained) and optionally eval.max_new_tokens, video.fps, video.max_pixels")
    e.add_argument("--videos", metavar="DIR", help="folder of videos named <video_id>.mp4 (with --videomme)")
    e.add_argument("--max-frames", type=int, default=32, help="frames sampled per video (with --videomme)")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="model=PATH task=NAME or any config key")
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plan", help="estimated peak memory per rank of one RL step, and settings that fit",
                        description="Estimate, from the config alone (no weights read), the peak memory per rank "
                                    "of one GRPO step: weights, gradients, AdamW moments, the reference, rollout KV "
                                    "cache, activations of the backprop mode, logits, video embeddings and the vision "
                                    "tower. With --memory-gib: the cheapest SP degree, backprop mode, stream_chunk and "
                                    "micro-batch that fit. Example: longrl plan --config examples/video_grpo.yaml "
                                    "video.max_frames=3600 --memory-gib 20")
    pl.add_argument("--config", help="YAML file of config keys (overridden by key=value)")
    pl.add_argument("--memory-gib", type=float, help="memory per rank to fit (GiB): search the settings")
    pl.add_argument("--world-size", type=int, help="processes (default: parallel.sp_size, one SP group)")
    pl.add_argument("--video-keep", type=float, default=1.0,
                    help="fraction of video tokens video.token_reduction keeps (content-dependent; default 1)")
    pl.add_argument("--prompt-tokens", type=int, help="text tokens of a prompt (default 64)")
    pl.add_argument("--json", action="store_true", help="print the estimate as JSON")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. video.max_frames=3600")
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", help="benchmarks printing JSON", description="Benchmarks: " + ", ".join(BENCHES))
    b.add_argument("name", choices=sorted(BENCHES))
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="benchmark options (see `longrl bench NAME -h`)")
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser("export", help="a run's checkpoint as a plain Hugging Face directory",
                       description="Copy a run's newest verified checkpoint (or --step N) to --out DIR as a plain "
                                   "Hugging Face directory (weights, config, tokenizer) that transformers loads "
                                   "without longrl. Example: longrl export runs/mine --out hf/mine")
    x.add_argument("run", help="run directory (runs/<name>) or one checkpoint directory")
    x.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    x.add_argument("--step", type=int, help="the checkpoint step to export (default: the newest verified)")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="get models: convert a GGUF file to a Hugging Face directory")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="{convert-gguf}")
    g = msub.add_parser("convert-gguf", help="a GGUF file as a plain Hugging Face directory",
                        description="Dequantise a GGUF model file (any architecture transformers reads; needs the "
                                    "gguf package: pip install 'longrl[gguf]') into --out DIR as float32 safetensors, "
                                    "config and tokenizer, for model.path=DIR. Example: longrl models convert-gguf "
                                    "SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m-instruct")
    g.add_argument("file", help="the .gguf file")
    g.add_argument("--out", required=True, help="directory to write (new or empty; never overwritten)")
    g.set_defaults(func=cmd_models)

    d = sub.add_parser("data", help="generate data sets", description="Generators: " + ", ".join(DATA))
    d.add_argument("generator", choices=sorted(DATA))
    d.add_argument("rest", nargs=argparse.REMAINDER, help="generator options (see `longrl data NAME -h`)")
    d.set_defaults(func=cmd_data)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus `key=value` overrides on both sides of an option: argparse fills a
    `nargs="*"` positional once, so `train a=1 --config f.yaml b=2` would leave b=2 over.
    They are kept, in order (later ones win); anything else left over is still an error."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    late = [a for a in rest if hasattr(args, "overrides") and "=" in a and not a.startswith("-")]
    if len(late) < len(rest):
        parser.error("unrecognized arguments: " + " ".join(a for a in rest if a not in late))
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that has gone (`| head`) shows here, where it is handled
        return code
    except BrokenPipeError:
        # Quiet, like other Unix tools: stdout goes to devnull so the exit flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for `yes | head`
    except UserError as e:
        print(f"longrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
