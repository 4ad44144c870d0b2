"""The error and warning types of the checkpoint storage layer."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the one-line message names the checkpoint, the file and the fix."""


class CheckpointDamaged(CheckpointError):
    """A file of the checkpoint (or its manifest) is missing, truncated or corrupt; `problem` says which."""

    def __init__(self, message: str, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message


class NotACheckpoint(CheckpointDamaged):
    """The path is not a checkpoint directory (it has no manifest.json)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is intact but its metadata differs from what the run expects (e.g. another model)."""


class CheckpointWarning(UserWarning):
    """Something was skipped or ignored (a damaged checkpoint under `--resume auto`, an unlisted file)."""
