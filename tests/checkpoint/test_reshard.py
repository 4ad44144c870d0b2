"""A checkpoint saved at one TP/PP/DP layout loads at another with the same eval loss (model and optimizer)."""
import pytest

from tests.helpers import run_on_ranks

from .reshard_runs import evaluate, save_then_evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("reshard"))
    distopt_dir = str(tmp_path_factory.mktemp("reshard-distopt"))
    on_two = run_on_ranks(save_then_evaluate, 2, run_dir, {"tp": 2},
                          {"pp2": {"pp": 2}, "dp2": {}, "tp2_sp": {"tp": 2, "sp": True}})[0]
    on_two.update({f"distopt_{k}": v for k, v in run_on_ranks(
        save_then_evaluate, 2, distopt_dir, {"distributed_optimizer": True},
        {"tp2": {"tp": 2, "distributed_optimizer": True}})[0].items()})
    on_two.update(run_on_ranks(evaluate, 1, run_dir, {"single": {}})[0])
    return on_two


@pytest.mark.parametrize("layout", ["pp2", "dp2", "tp2_sp", "single"])
def test_tp2_checkpoint_loads_at_other_layouts(losses, layout):
    assert losses[layout][0] == pytest.approx(losses["saved"][0], rel=1e-6)  # model state
    assert losses[layout][1] == pytest.approx(losses["saved"][1], rel=1e-5)  # + optimizer state, one step on


def test_distributed_optimizer_checkpoint_reshards(losses):
    assert losses["distopt_tp2"][0] == pytest.approx(losses["distopt_saved"][0], rel=1e-6)
    assert losses["distopt_tp2"][1] == pytest.approx(losses["distopt_saved"][1], rel=1e-5)


def test_the_step_after_loading_depends_on_the_restored_optimizer(losses):
    # Negative control for the second number: with fresh optimizer state the step goes elsewhere.
    assert losses["weights_only"][0] == pytest.approx(losses["saved"][0], rel=1e-6)
    assert abs(losses["weights_only"][1] - losses["saved"][1]) > 1e-4
