"""Train the same tiny Crystal under several parallel layouts in one process group (spawned by the tests)."""
from __future__ import annotations

import tempfile

from megacrystal.config import config_from_dict
from megacrystal.distributed import cpu_compat, shm_reduce
from megacrystal.train.loop import train

TINY = {
    "model": {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 96, "vocab_size": 128,
              "seq_length": 32, "mup_width_scale": 0.25},
    # A small clip threshold makes every step clip, so the global grad norm across TP/PP/DP is exercised.
    "optim": {"lr": 0.01, "warmup_steps": 0, "end_lr": 0.01, "clip_grad": 0.05},
    "train": {"steps": 5, "global_batch_size": 8, "micro_batch_size": 2, "seed": 5, "threads": 1},
}


def _with(overrides: dict, base: dict = TINY) -> dict:
    merged = {section: dict(values) for section, values in base.items()}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        merged.setdefault(section, {})[key] = value
    return merged


def losses_per_layout(layouts: dict[str, dict], without_cpu_config: tuple[str, ...] = ()) -> dict[str, dict]:
    """name -> {loss, grad_norm} per step, for each layout (parallel.* overrides), run one after another.

    Layouts named in `without_cpu_config` run without cpu_compat's TransformerConfig overrides, to show
    they are still needed.
    """
    results = {}
    chunks_reduced_in_shm = []  # a spy: the real function runs, and each call is counted
    original = shm_reduce.reduce_through_shared_memory
    shm_reduce.reduce_through_shared_memory = lambda *args: (chunks_reduced_in_shm.append(1), original(*args))
    for name, overrides in layouts.items():
        chunks_reduced_in_shm.clear()
        with tempfile.TemporaryDirectory() as run_dir:
            config = config_from_dict(_with({**overrides, "run.dir": run_dir}))
            saved = cpu_compat.transformer_config_overrides
            if name in without_cpu_config:
                cpu_compat.transformer_config_overrides = lambda: {}
            try:
                records = train(config)
            finally:
                cpu_compat.transformer_config_overrides = saved
        results[name] = {"loss": [r.loss for r in records], "grad_norm": [r.grad_norm for r in records],
                         "shared_memory_grad_reduce": bool(chunks_reduced_in_shm)}
    return results
