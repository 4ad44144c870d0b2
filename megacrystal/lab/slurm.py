"""`megacrystal ablate --slurm`: one sbatch script per variant (the trainer's own SLURM script, with the
variant's overrides and run directory), and an array job whose task i runs variant i's script."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..launch.slurm import SlurmJob, render, resolve
from .grid import Grid
from .runner import run_dir


def variant_job(grid: Grid, out: Path, index: int, template: SlurmJob) -> SlurmJob:
    """The resolved SLURM job of variant `index`: its overrides and run directory, named <grid>-<variant>."""
    variant = grid.variants[index]
    where = run_dir(out, variant).resolve()
    overrides = [*template.overrides, *variant.overrides, f"run.dir={where}", f"checkpoint.dir={where / 'checkpoints'}"]
    # Finished is what `ablate --report-only` and a rerun look for; $SECONDS is the batch script's run time.
    mark = (f"from megacrystal.lab.runner import mark_done; "
            f"mark_done({json.dumps(str(where))}, {json.dumps(variant.name)}, {json.dumps(list(variant.overrides))}, "
            f"float(sys.argv[1]))")  # JSON literals are Python literals, and shell-quote cleanly
    on_success = f"{shlex.quote(template.python)} -c {shlex.quote('import sys; ' + mark)} \"$SECONDS\""
    return resolve(SlurmJob(**{**template.__dict__, "config": str(grid.base.resolve()), "overrides": overrides,
                               "job_name": f"{grid.name}-{variant.name}", "log_dir": str(where / "slurm"),
                               "on_success": on_success}))


def render_grid(grid: Grid, out: Path, template: SlurmJob, command: str = "") -> dict[str, str]:
    """{file name: script}: variant-<name>.sbatch for each variant, and array.sbatch over all of them."""
    scripts = {f"variant-{v.name}.sbatch": render(variant_job(grid, out, i, template), command)
               for i, v in enumerate(grid.variants)}
    first = variant_job(grid, out, 0, template)
    # The array task runs the variant's script with bash: its #SBATCH lines are comments there, and the array's
    # own header carries the resources (the same for every variant: they share the template).
    header = [line for line in scripts[f"variant-{grid.variants[0].name}.sbatch"].splitlines()
              if line.startswith("#SBATCH") and "--job-name" not in line and "--output" not in line]
    log_dir = (out / "slurm").resolve()
    names = " ".join(shlex.quote(f"variant-{v.name}.sbatch") for v in grid.variants)
    scripts["array.sbatch"] = "\n".join([
        "#!/bin/bash",
        f"# megacrystal ablation array job for grid {grid.name}: task i trains variant i with its own script.",
        f"#   {command or 'megacrystal ablate --slurm'}",
        f"#SBATCH --job-name={grid.name}",
        f"#SBATCH --array=0-{len(grid.variants) - 1}",
        f"#SBATCH --output={log_dir}/%x-%A_%a.out",
        *header,
        "set -euo pipefail",
        f"SCRIPTS=({names})",
        f"cd {shlex.quote(str(Path(first.workdir)))}",
        f"exec bash {shlex.quote(str(out.resolve() / 'slurm'))}/\"${{SCRIPTS[$SLURM_ARRAY_TASK_ID]}}\"",
        "",
    ])
    return scripts


def write_scripts(scripts: dict[str, str], out: Path) -> Path:
    """Write the rendered scripts into <out>/slurm/ and return that directory."""
    directory = out / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (directory / name).write_text(text)
    return directory
