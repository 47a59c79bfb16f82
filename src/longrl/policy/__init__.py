"""The Policy interface and its text and video implementations (`base.py`)."""
