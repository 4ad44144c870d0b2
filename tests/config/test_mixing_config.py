"""The `mixing` option of a phase: defaults, the plan it gives, and one-line errors that name the field."""
from pathlib import Path

import pytest

from megacrystal.config import ConfigError, load_config
from megacrystal.schedule.from_config import plan_for
from megacrystal.schedule.plan import MixingSpec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "crystal-tiny.yaml"
RECIPE = CONFIGS / "lab" / "online-mixing.yaml"


def test_phases_without_mixing_keep_their_weights():
    assert all(phase.mixing is None for phase in plan_for(load_config(TINY)).phases)


def test_the_recipe_mixes_its_second_phase_online():
    warmup, mixed = plan_for(load_config(RECIPE)).phases
    assert warmup.mixing is None
    assert mixed.mixing == MixingSpec(rule="eg", eta=2.0, every=10, epsilon=0.1, smoothing=0.5, reference="first",
                                      grid=1024)
    assert plan_for(load_config(RECIPE, ["data.phases.mixed.mixing.mode=static"])).phases[1].mixing is None


def test_one_override_turns_mixing_on_with_defaults():
    phase = plan_for(load_config(TINY, ["data.phases.mixed.mixing.mode=online"])).phases[1]
    assert phase.mixing == MixingSpec()
    phase = plan_for(load_config(TINY, ["data.phases.mixed.mixing.exploration=decay"])).phases[1]
    assert phase.mixing == MixingSpec(exploration="decay")


@pytest.mark.parametrize("overrides, message", [
    (["data.phases.text.mixing.every=2"],
     "data.phases.text.mixing: online mixing needs at least two datasets in the phase's weights"),
    (["data.phases.mixed.mixing.reference={prose: 3.0, web: 2.0}"],
     "data.phases.mixed.mixing.reference: give a loss for each of the phase's datasets (prose, python, web), "
     "got prose, web"),
    (["data.phases.mixed.mixing.rule=doremi"], "data.phases.mixed.mixing.rule: input should be 'eg' or 'exp3'"),
    (["data.phases.mixed.mixing.eta=0"], "data.phases.mixed.mixing.eta: input should be greater than 0"),
    (["data.phases.mixed.mixing.epsilon=1.5"], "data.phases.mixed.mixing.epsilon: input should be less than or equal"),
    (["data.phases.mixed.mixing.exploration=fast"],
     "data.phases.mixed.mixing.exploration: input should be 'fixed' or 'decay'"),
    (["data.phases.mixed.mixing.smoothing=1"], "data.phases.mixed.mixing.smoothing: input should be less than 1"),
    (["data.phases.mixed.mixing.every=0"], "data.phases.mixed.mixing.every: input should be greater than or equal"),
    (["data.phases.mixed.mixing.grid=1"], "data.phases.mixed.mixing.grid: input should be greater than or equal"),
    (["data.phases.mixed.mixing.bogus=1"], "data.phases.mixed.mixing.bogus: unknown key"),
    (["data.phases.mixed.mixing.every=2", "engine=deepspeed"],
     "data.phases.mixed.mixing: online mixing needs the per-row training losses only engine: megatron reports"),
])
def test_bad_mixing_raises_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_window_longer_than_the_phase_is_refused_before_training():
    config = load_config(TINY, ["data.phases.mixed.mixing.every=150"])  # the phase has 150 steps
    with pytest.raises(ConfigError, match=r"^data.phases: phase 'mixed': mixing.every \(150\) is not below the "
                                          r"phase's 150 steps, so its weights would never change; lower it$"):
        plan_for(config)
