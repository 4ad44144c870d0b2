"""Silence upstream warnings that are expected on every run and say nothing actionable."""
from __future__ import annotations

import warnings

_EXPECTED = (
    # megatron-core announces its fallbacks when Apex / Transformer Engine are absent (always, on CPU).
    r".*(Transformer Engine|Apex) (is|are) not installed.*",
    r"full scope is deprecated.*",
    r"When using sequence parallelism it is recommended to set the environment variable CUDA_DEVICE_MAX.*",
    # megatron's optimizer probes `.grad` on non-leaf main-param views of the distributed optimizer.
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed.*",
    # megatron's distributed optimizer and DeepSpeed's ZeRO call the collectives under their older names.
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
)
# FutureWarnings that megatron's dist_checkpointing triggers in torch.distributed.checkpoint on every resume and
# export: it still calls the old entry points and builds ShardedTensors (megatron's to change, not ours).
_EXPECTED_FUTURE = (
    r"`(load|save)_state_dict` is deprecated and will be removed in future versions.*",
    r"Please use DTensor instead and we are deprecating ShardedTensor.*",
)


def quiet_expected_warnings() -> None:
    """Install the filters (per process; spawned ranks call it again through the CLI or runtime)."""
    for pattern in _EXPECTED:
        warnings.filterwarnings("ignore", message=pattern)
    for pattern in _EXPECTED_FUTURE:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
