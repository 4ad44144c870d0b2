"""`megacrystal prepare --slurm-array N`: render (and optionally submit) a SLURM array job that runs prepare
split over N tasks, task i doing `--shard-index i --num-shards N`, and a final task that writes the metas.

Each array task skips shards that are complete, so a preempted or failed task is simply requeued or rerun;
the dependent last job (`afterany`) reruns prepare without sharding, which builds only what is still missing
and writes every dataset's meta and the report.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .errors import DataError

TEMPLATE = """#!/bin/bash
# Rendered by `megacrystal prepare --slurm-array {tasks}`; submit with: sbatch {script}
#SBATCH --job-name={name}
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task={cpus}
#SBATCH --output={log_dir}/%x-%A_%a.out
#SBATCH --requeue
{extra}
set -euo pipefail
cd {workdir}
exec {python} -m megacrystal prepare --config {config}{overrides} \\
    --workers {workers} --shard-index "$SLURM_ARRAY_TASK_ID" --num-shards {tasks}
"""


def render(config: str, overrides: list[str], tasks: int, workers: int, out: Path,
           sbatch: list[str] | None = None, workdir: str = ".") -> Path:
    """Write the array script to `out` and the finishing script next to it; return the array script."""
    if tasks < 1:
        raise DataError(f"--slurm-array {tasks}: give the number of array tasks (at least 1)")
    workdir_abs = Path(workdir).resolve()
    config_abs = (workdir_abs / config).resolve()
    if not config_abs.is_file():
        raise DataError(f"config {config_abs} not found; --slurm-array needs the config path the nodes will use")
    log_dir = out.resolve().parent / "logs"
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    extra = "\n".join(f"#SBATCH {line}" for line in (sbatch or []))
    text = TEMPLATE.format(tasks=tasks, last=tasks - 1, script=out, name="megacrystal-prepare",
                           cpus=workers + 1, log_dir=log_dir, extra=extra, workdir=shlex.quote(str(workdir_abs)),
                           python=shlex.quote(sys.executable), config=shlex.quote(str(config_abs)),
                           overrides=sets, workers=workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.chmod(0o755)
    finish = out.with_name(out.stem + "-finish.sh")
    finish.write_text("#!/bin/bash\n# After the array: build any shard still missing and write the metas.\n"
                      f"#SBATCH --job-name=megacrystal-prepare-finish\n#SBATCH --cpus-per-task={workers + 1}\n"
                      f"#SBATCH --output={log_dir}/%x-%j.out\n{extra}\nset -euo pipefail\n"
                      f"cd {shlex.quote(str(workdir_abs))}\nexec {shlex.quote(sys.executable)} -m megacrystal "
                      f"prepare --config {shlex.quote(str(config_abs))}{sets} --workers {workers}\n")
    finish.chmod(0o755)
    return out


def submit_hint(script: Path) -> str:
    """The two sbatch commands that run the array and then the finishing job."""
    finish = script.with_name(script.stem + "-finish.sh")
    return (f"jid=$(sbatch --parsable {script}) && "
            f"sbatch --dependency=afterany:${{jid%%;*}} {finish}")
