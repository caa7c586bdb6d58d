"""palsd: a power-aware control daemon for vLLM inference hosts."""

__version__ = "0.1.0"
