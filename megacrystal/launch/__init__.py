"""Launching runs on more than one machine: SLURM batch scripts and the per-node torchrun they start.

- `commands.py`: the `megacrystal launch slurm` subcommand (registered through cli.EXTRA_COMMANDS).
- `slurm.py`: renders launch/slurm/train.sbatch.in for a run, checks it against the config, submits it.
- `torchrun.py`: torchrun for one node: forwards SIGUSR1 to the trainers, exits 75 after a stop with a checkpoint.
- `worker.py`: the trainer process's entry point under that torchrun.
"""
