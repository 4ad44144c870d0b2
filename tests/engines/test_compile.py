"""train.compile (torch.compile of every transformer layer) trains exactly like the eager model."""
import pytest

from tests.helpers import run_on_ranks

from .compile_runs import eager_and_compiled

pytestmark = pytest.mark.slow


def test_compiled_layers_give_the_eager_losses_and_gradients(synthetic_config, tmp_path):
    (runs,) = run_on_ranks(eager_and_compiled, 1, str(synthetic_config), str(tmp_path))
    eager, compiled = runs[False], runs[True]
    assert eager["graphs"] == 0 and compiled["graphs"] > 0  # dynamo did compile the layers
    assert compiled["graph_breaks"] == {}  # each layer is one graph (CrystalRowParallelLinear)
    assert len(compiled["losses"]) == 4
    for key in ("losses", "grad_norms"):  # inductor reorders float math: equal to rounding, not bit for bit
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key
