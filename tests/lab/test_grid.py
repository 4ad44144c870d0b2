"""Grids, SLURM rendering (as text), the report's tables and the fitted mixture, without training."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from megacrystal.config import ConfigError
from megacrystal.lab.fit import fit_mixture, parse_target
from megacrystal.lab.grid import load_grid
from megacrystal.lab.report import markdown, mixture
from megacrystal.lab.runner import variant_args
from megacrystal.launch.slurm import SlurmJob
from megacrystal.schedule.from_config import plan_for

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "configs" / "lab"


def test_shipped_grids_load_and_set_their_blends():
    grid = load_grid(LAB / "code-fraction-grid.yaml")
    assert [v.name for v in grid.variants] == ["code-00", "code-25", "code-50", "code-75"]
    code = [v.config.data.phases["stable"].weights["python"] + v.config.data.phases["stable"].weights["web"]
            for v in grid.variants]
    assert code == [0.0, 0.25, 0.5, 0.75]
    cool = load_grid(LAB / "code-cooldown-grid.yaml")
    assert len(cool.variants) == 8
    text_only = [v for v in cool.variants if v.name.endswith("cool-text")]
    assert all(v.config.data.phases["cooldown"].weights == {"prose": 1.0, "python": 0.0, "web": 0.0}
               for v in text_only)


def test_slimpajama_sources_grid_keeps_the_natural_ratios():
    grid = load_grid(LAB / "slimpajama-sources-grid.yaml")
    weights = {v.name: plan_for(v.config).phases[0].weights for v in grid.variants}
    natural = weights["natural"]
    assert natural["commoncrawl"] == pytest.approx(0.5335, abs=1e-4) and len(natural) == 7
    for name, w in weights.items():
        assert sum(w.values()) == pytest.approx(1.0)
        if name.startswith("no-"):
            left_out = name[3:]
            assert w[left_out] == 0.0
            scale = 1 / (1 - natural[left_out])
            assert all(w[d] == pytest.approx(natural[d] * scale) for d in w if d != left_out)
    assert weights["web-only"]["commoncrawl"] / weights["web-only"]["c4"] == pytest.approx(
        natural["commoncrawl"] / natural["c4"], rel=1e-3)


def test_grid_errors_name_the_variant_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": str(LAB / "code-cooldown.yaml"),
                                   "variants": {"ok": {"train.seed": 1}, "typo": {"data.phases.stabel.tokens": 5}}}))
    with pytest.raises(ConfigError, match="variant typo: .*unknown phase 'stabel'"):
        load_grid(bad)
    bad.write_text(yaml.safe_dump({"variants": {"a b": {"train.seed": 1}}}))
    with pytest.raises(ConfigError, match="variant name 'a b'"):
        load_grid(bad, LAB / "code-cooldown.yaml")
    with pytest.raises(ConfigError, match="no `base:`"):
        load_grid(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_grid(tmp_path / "missing.yaml")


def test_variant_runs_in_its_own_directories(tmp_path):
    grid = load_grid(LAB / "code-fraction-grid.yaml", extra=["train.seed=7"])
    args = variant_args(tmp_path, grid, grid.variants[1])
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert sets[0] == "train.seed=7" and sets[1].startswith("data.phases.stable.weights=")
    assert f"run.dir={tmp_path.resolve() / 'code-25'}" in sets
    assert f"checkpoint.dir={tmp_path.resolve() / 'code-25' / 'checkpoints'}" in sets
    assert args[-2:] == ["--resume", "auto"]


def test_slurm_renders_one_script_per_variant_and_an_array(tmp_path):
    from megacrystal.lab.slurm import render_grid

    grid = load_grid(LAB / "code-fraction-grid.yaml")
    template = SlurmJob(config=str(grid.base), nodes=1, gpus_per_node=0, cpus_per_node=2, partition="debug",
                        python="/opt/venv/bin/python", check=False)  # paths only the nodes see
    scripts = render_grid(grid, tmp_path, template, "megacrystal ablate ...")
    assert sorted(scripts) == ["array.sbatch", *sorted(f"variant-{v.name}.sbatch" for v in grid.variants)]
    for v in grid.variants:
        text = scripts[f"variant-{v.name}.sbatch"]
        assert f"#SBATCH --job-name=code-fraction-grid-{v.name}" in text
        assert f"--set run.dir={tmp_path.resolve() / v.name}" in text
        assert "--set 'data.phases.stable.weights={" in text and "--resume auto" in text
        assert "#SBATCH --partition=debug" in text and "#SBATCH --cpus-per-task=2" in text
        assert f'mark_done("{tmp_path.resolve() / v.name}", "{v.name}", [' in text  # after training finished
    array = scripts["array.sbatch"]
    assert "#SBATCH --array=0-3" in array and "#SBATCH --partition=debug" in array
    assert "SCRIPTS=(variant-code-00.sbatch variant-code-25.sbatch variant-code-50.sbatch variant-code-75.sbatch)" \
        in array
    assert 'exec bash ' in array and '"${SCRIPTS[$SLURM_ARRAY_TASK_ID]}"' in array


def _results(mixtures: dict[str, dict[str, float]], law) -> dict:
    return {name: {"mixture": w, "phases": {"last": {"bpb_per_dataset": law(w)}}} for name, w in mixtures.items()}


def test_fit_recovers_a_log_linear_law_and_predicts_held_out_variants():
    truth = {"prose": {"prose": 0.4, "python": 1.6, "web": 1.2}, "python": {"prose": 1.5, "python": 0.3, "web": 0.9}}

    def law(w):
        return {k: float(np.exp(sum(b[d] * w[d] for d in w))) for k, b in truth.items()}

    mixes = {"a": {"prose": 1.0, "python": 0.0, "web": 0.0}, "b": {"prose": 0.5, "python": 0.25, "web": 0.25},
             "c": {"prose": 0.25, "python": 0.5, "web": 0.25}, "d": {"prose": 0.2, "python": 0.2, "web": 0.6},
             "e": {"prose": 0.6, "python": 0.3, "web": 0.1}}
    fit = fit_mixture(_results(mixes, law), {"prose": 0.5, "python": 0.5})
    for d, coef in fit["coefficients"].items():
        assert coef == pytest.approx(truth[d], abs=2e-3)
    for row in fit["held_out"]:  # noise-free data: every held-out variant is predicted
        assert row["predicted"] == pytest.approx(row["measured"], rel=2e-3), row["variant"]
    # The proposal is the target's minimum over the lattice inside the tried box, checked by brute force.
    best = min(((p / 40, q / 40, 1 - (p + q) / 40) for p in range(41) for q in range(41 - p)
                if 0.2 - 1e-9 <= p / 40 <= 1 and q / 40 <= 0.5 + 1e-9 and 1 - (p + q) / 40 <= 0.6 + 1e-9),
               key=lambda w: sum(0.5 * v for v in law(dict(zip(("prose", "python", "web"), w))).values()))
    assert list(fit["proposal"]["weights"].values()) == pytest.approx(best, abs=1e-9)


def test_fit_needs_three_variants_and_known_domains():
    law = lambda w: {"prose": 1.0}  # noqa: E731
    two = _results({"a": {"prose": 1.0}, "b": {"prose": 1.0}}, law)
    with pytest.raises(ConfigError, match="at least 3"):
        fit_mixture(two)
    three = _results({"a": {"prose": 1.0}, "b": {"prose": 1.0}, "c": {"prose": 1.0}}, law)
    with pytest.raises(ConfigError, match="python"):
        fit_mixture(three, {"python": 1.0})
    assert parse_target("prose=3,python=1") == {"prose": 0.75, "python": 0.25}
    with pytest.raises(ConfigError):
        parse_target("prose=x")


def test_mixture_weights_phases_by_their_steps_and_markdown_shows_each_phase():
    grid = load_grid(LAB / "code-fraction-grid.yaml")
    plan = plan_for(grid.variants[0].config)  # stable 160 steps of prose, cooldown 40 of 0.5 / 0.25 / 0.25
    assert mixture(plan) == pytest.approx({"prose": 0.9, "python": 0.05, "web": 0.05})
    results = {"v": {"mixture": {"prose": 1.0}, "phases": {
        "stable": {"bpb": 1.5, "bpb_per_dataset": {"prose": 1.25, "web": 2.0}},
        "cooldown": {"bpb": 1.0, "bpb_per_dataset": {"prose": 0.75, "web": 1.5}}}}}
    table = markdown(results)
    assert "| variant | mixture | stable: prose | stable: web | stable: all | cooldown: prose |" in table
    assert "| v | prose 1.000 | 1.2500 | 2.0000 | 1.5000 | 0.7500 | 1.5000 | 1.0000 |" in table


def test_ablate_slurm_checks_paths_unless_no_check(tmp_path):
    """The SlimPajama grid's inputs exist only on a cluster: one line names the field, --no-check renders."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "megacrystal", "ablate", "--grid", str(LAB / "slimpajama-sources-grid.yaml"),
               "--out", str(tmp_path / "out"), "--slurm", "--cpus-per-node", "2"]
    checked = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert checked.returncode != 0
    assert "data.datasets.arxiv.inputs" in checked.stderr and "--no-check" in checked.stderr
    assert len(checked.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "slurm").exists()
    rendered = subprocess.run([*command, "--no-check"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert len(list((tmp_path / "out" / "slurm").glob("variant-*.sbatch"))) == 7
