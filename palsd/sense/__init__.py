"""Adapters that read the world: GPUs, vLLM servers, budget sources."""
