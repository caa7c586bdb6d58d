"""The decision core: pure functions and value objects. No I/O, no clock, no adapters."""
