"""Checkpoints: the engine-independent storage layer (manifest, atomic commits, retention, resume resolution).

Only the pure-Python storage API is imported here; the megatron save/load lives in `checkpoint.megatron`.
"""
from .errors import CheckpointDamaged, CheckpointError, CheckpointMismatch, CheckpointWarning, NotACheckpoint
from .manifest import read_manifest, verify, write_manifest
from .store import LATEST, CheckpointStore, step_name

__all__ = [
    "CheckpointDamaged", "CheckpointError", "CheckpointMismatch", "CheckpointStore", "CheckpointWarning",
    "LATEST", "NotACheckpoint", "read_manifest", "step_name", "verify", "write_manifest",
]
