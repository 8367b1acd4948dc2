"""atric: audio-text retrieval in context."""

__version__ = "0.1.0"
