"""Adapters that change the world: power limits (through a GPU backend) and batch limits."""
