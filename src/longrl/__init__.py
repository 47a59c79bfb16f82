"""longrl: RL post-training of language and video-language models on long sequences."""

__version__ = "0.1.0"
