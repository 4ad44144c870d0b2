"""Training engines: one small protocol, implemented with megatron-core (and DeepSpeed)."""
