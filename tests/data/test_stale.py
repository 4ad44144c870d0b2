"""Stale data: a changed input, field or filter stops `train` in one line and re-prepares in `prepare`; a resumed
run whose datasets changed stops unless --allow-data-change, then continues from the recorded cursors."""
import copy
import re
import json
from pathlib import Path

import pytest
import yaml

from megacrystal.config.loader import config_from_dict
from megacrystal.data.errors import DataError
from megacrystal.data.pipeline import open_streams, prepare
from megacrystal.data.source import BlendedSource
from megacrystal.schedule.from_config import plan_for

from .conftest import stdlib_docs
from .formats import write_jsonl, write_zst

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def setup(tmp_path, small_tok):
    texts = stdlib_docs(160)
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "lang": "py"} for t in texts[:80]])
    write_zst(tmp_path / "b.jsonl.zst", [{"text": t} for t in texts[80:]])
    raw = yaml.safe_load((ROOT / "configs" / "crystal-tiny.yaml").read_text())
    raw["run"]["dir"] = str(tmp_path / "run")
    raw["model"]["seq_length"] = 32
    raw["data"] = {"source": "indexed", "dir": str(tmp_path / "data"), "tokenizer": {"model": small_tok.source},
                   "datasets": {"a": {"inputs": [str(a)]}, "b": {"inputs": [str(tmp_path / "b.jsonl.zst")],
                                                                 "fim": True}},
                   "phases": {"one": {"tokens": 4096, "weights": {"a": 0.5, "b": 0.5}, "lr": {"peak": 0.01}}},
                   "valid_fraction": 0.05, "workers": 1}
    return raw, a


def cfg(raw, **data):
    raw = copy.deepcopy(raw)
    for dotted, value in data.items():
        node = raw["data"]
        *path, last = dotted.split("__")
        for key in path:
            node = node[key]
        node[last] = value
    return config_from_dict(raw)


def test_changed_inputs_field_or_filters_stop_train_and_re_prepare(setup, capsys):
    raw, a = setup
    assert set(prepare(cfg(raw))["datasets"]) == {"a", "b"}
    open_streams(cfg(raw), "train")
    with pytest.raises(DataError, match=r"dataset 'b' is stale: filters changed"):
        open_streams(cfg(raw, datasets__b__filters={"lang": ["py"]}), "train")
    with a.open("a") as fh:
        fh.write(json.dumps({"text": "one more document", "lang": "py"}) + "\n")
    with pytest.raises(DataError, match=rf"dataset 'a' is stale: input {a} changed \(\d+ -> \d+ bytes\); "
                                        r"re-run `megacrystal prepare`"):
        open_streams(cfg(raw), "train")
    missing = str(a.parent / "nowhere.jsonl")
    with pytest.raises(DataError, match=rf"dataset 'a' is stale: input {missing} does not exist"):
        open_streams(cfg(raw, datasets__a__inputs=[missing]), "train")
    with pytest.raises(DataError, match=r"dataset 'a' is stale: text_field changed \('text' -> 'body'\)"):
        open_streams(cfg(raw, datasets__a__text_field="body"), "train")
    capsys.readouterr()
    report = prepare(cfg(raw))
    assert {n: d["status"] for n, d in report["datasets"].items()} == {"a": "built", "b": "skipped"}
    assert re.search(r"prepare a: input .*a\.jsonl changed \(\d+ -> \d+ bytes\); re-preparing",
                     capsys.readouterr().err)
    open_streams(cfg(raw), "train")


def test_resume_with_changed_data_stops_unless_allowed(setup):
    raw, a = setup
    prepare(cfg(raw))
    config = cfg(raw)
    plan = plan_for(config)

    def source(config):
        tok, streams = open_streams(config, "train")
        return BlendedSource(streams, {"b"}, plan, 7, tok.eos_id, tok.fim_ids)

    first = source(config)
    for step in range(3):
        first.global_batch(step)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert source(config).load_state_dict(state) is None  # unchanged data resumes silently
    write_jsonl(a, [{"text": t} for t in stdlib_docs(40, skip=10)])
    prepare(config)
    with pytest.raises(DataError, match=r"dataset 'a' \(\d+ -> \d+ samples\) changed since the checkpoint.*"
                                        r"--allow-data-change"):
        source(config).load_state_dict(state)
    allowed = source(cfg(raw, allow_data_change=True))
    allowed.load_state_dict(state)
    saved = state["datasets"]
    now = allowed.sampler.state_dict()["datasets"]
    assert now["b"] == saved["b"]  # an unchanged dataset continues exactly where it was
    assert now["a"]["consumed"] == saved["a"]["consumed"]
    assert now["a"]["position"] == min(saved["a"]["position"], now["a"]["size"]) or now["a"]["position"] == 0
    allowed.global_batch(3)  # and sampling goes on
