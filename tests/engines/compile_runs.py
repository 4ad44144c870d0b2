"""Rank-side function for test_compile.py: the same short run eager and with train.compile."""
from megacrystal.config import load_config


def eager_and_compiled(config_path: str, run_root: str, *overrides: str) -> dict:
    import time

    from megacrystal.train.loop import train

    import torch._dynamo

    out = {}
    for compiled in (False, True):
        config = load_config(config_path, [f"train.compile={str(compiled).lower()}", "train.steps=4",
                                           "checkpoint.interval=null", f"run.dir={run_root}/compile_{compiled}", *overrides])
        start = time.perf_counter()
        records = train(config, resume="none")
        out[compiled] = {"losses": [r.loss for r in records], "grad_norms": [r.grad_norm for r in records],
                         "seconds": time.perf_counter() - start,
                         "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                         "graph_breaks": dict(torch._dynamo.utils.counters["graph_break"])}
    return out
