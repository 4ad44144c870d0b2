"""Process groups, parallel layout and the CPU compatibility layer for megatron-core."""
