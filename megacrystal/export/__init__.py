"""Exports of a megacrystal checkpoint to Cerebras Model Zoo (params.yaml + .mdl) and Hugging Face (CrystalCoder),
imports back from both, and `megacrystal score`.

`keys` (name and layout maps) and `cerebras.params_yaml` are pure Python/torch; everything that builds the model
imports megatron-core lazily, so `megacrystal export ...` reports bad input before that slow import.
"""
