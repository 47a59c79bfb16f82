"""An experiment, not a feature: token reduction 'diff' plus an adaptive refresh, run through
`longrl train` (BENCHMARKS.md, the long-video section's table of reduction rules).

Per video, the threshold's keep mask is topped up by the longest refresh interval r (a patch
dropped r - 1 steps in a row is kept at the next) that still keeps at least FLOOR of the
tokens (environment variable, default 0.5). `video.max_unseen` is the fixed-interval form of
this that the library ships; pass video.max_unseen=0 so only this rule applies:

    python examples/reduce_floor_experiment.py train --config examples/video_grpo.yaml \\
        video.max_frames=32 video.token_reduction=diff video.max_unseen=0 train.seed=0
"""

import os
import sys

import torch

from longrl.cli import main
from longrl.media import reduce

FLOOR = float(os.environ.get("FLOOR", "0.5"))
threshold_only = reduce.METHODS["diff"]


def diff_with_adaptive_refresh(tokens: torch.Tensor, threshold: float) -> torch.Tensor:
    """keep [Tg, S]: the threshold's mask, refreshed at the longest interval keeping >= FLOOR."""
    keep = threshold_only(tokens, threshold)
    if keep.float().mean() >= FLOOR:
        return keep
    for r in range(keep.shape[0], 0, -1):
        k = reduce.refresh(keep, r - 1) if r > 1 else torch.ones_like(keep)
        if k.float().mean() >= FLOOR:
            return k
    return torch.ones_like(keep)


reduce.METHODS["diff"] = diff_with_adaptive_refresh

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
