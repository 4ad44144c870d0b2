"""The Crystal model: architecture on megatron-core, muP init and optimizer groups, size and FLOPs.

Import the submodules directly (`megacrystal.model.crystal` imports megatron-core, which is slow).
"""
