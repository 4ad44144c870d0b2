"""Crystal's speed kernels and the one function that chooses them (select.py).

One file per kernel, each with its plain torch reference path beside it for the tests: attention.py (causal
attention core), rotary.py (rotary embedding inside the attention copy), swiglu.py (MLP activation), vocab.py
(embedding and output projection of the tied weight), cross_entropy.py (vocab-parallel loss), row_parallel.py
(megatron's RowParallelLinear without a per-forward warning), layernorm.py (LayerNorm with bias under sequence
parallelism). select.py decides per device, precision and importable packages; spec.py turns the decision into
megatron-core layer specs. Imports go one way: model/ uses kernels/, never the reverse. Import the kernel modules
directly: most import megatron-core, which is slow; select.py imports nothing heavy.
"""
