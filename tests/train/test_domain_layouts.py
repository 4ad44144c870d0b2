"""The per-row losses behind the per-dataset training loss are the same at every layout (1 process; DP=2; TP=2)."""
import pytest
import torch

from megacrystal.train.domain_loss import loss_per_dataset
from tests.helpers.ranks import run_on_ranks
from tests.train.domain_runs import row_losses_per_layout

pytestmark = pytest.mark.slow
# Rows of the 8-row global batch labelled as three datasets, interleaved so every rank holds rows of several.
SAMPLES = [(name, i) for i, name in enumerate(["a", "b", "c", "a", "b", "a", "c", "a"])]


def test_row_losses_and_per_dataset_loss_do_not_depend_on_the_layout():
    (single,) = run_on_ranks(row_losses_per_layout, 1, {"one": {}})
    pair = run_on_ranks(row_losses_per_layout, 2, {"dp2": {}, "tp2": {"parallel.tp": 2}})
    assert pair[0] == pair[1]  # every rank gets the same rows
    reference = single["one"]
    # DP splits the rows, each computed exactly as in one process (from step 2 on the weights differ by the
    # order of the gradient sums, as the step losses do).
    assert pair[0]["dp2"][0] == reference[0]
    for step, rows in enumerate(reference):
        for layout in ("dp2", "tp2"):
            assert torch.tensor(pair[0][layout][step]) == pytest.approx(torch.tensor(rows), rel=1e-5), (layout, step)
    for step, (tp_rows, rows) in enumerate(zip(pair[0]["tp2"], reference)):
        assert all(tokens == 32 for _, tokens in rows)
        got = loss_per_dataset(torch.tensor(tp_rows, dtype=torch.float64), SAMPLES)
        want = loss_per_dataset(torch.tensor(rows, dtype=torch.float64), SAMPLES)
        assert got == pytest.approx(want, rel=1e-5)
        a_rows = [rows[i][0] for i, (name, _) in enumerate(SAMPLES) if name == "a"]
        assert want["a"] == pytest.approx(sum(a_rows) / (32 * len(a_rows)), rel=1e-12)
