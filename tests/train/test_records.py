"""Step records: every field round-trips exactly, version-1 files without the version key still read."""
import dataclasses
import json
import math

import pytest

from megacrystal.config import ConfigError
from megacrystal.train.records import (SCHEMA_VERSION, EvalRecord, RecordsFile, StepRecord, count_records,
                                       read_records)


def _full() -> StepRecord:
    """A record with every field set to a value no default has (floats that JSON must keep to the last bit)."""
    return StepRecord(
        step=7, phase="mixed", tokens=7 * 2048, loss=7.123456789012345, lr=0.1 + 0.2, grad_norm=math.pi,
        skipped=True, step_time_s=1 / 3, data_time_s=2 ** -40, tokens_per_s=6143.999999999999,
        tflops_per_device=1e-17, mfu=0.123456789, samples={"prose": 9, "python": 7},
        consumed_tokens={"prose": 9 * 128, "python": 7 * 128}, loss_per_dataset={"prose": 7.5, "python": 6.25},
        blend_weights={"prose": 0.5009765625, "python": 0.4990234375},
        eval=EvalRecord(loss_per_dataset={"prose": 7.0000000001}, bpb=1.1, bpb_per_dataset={"prose": 1.2}),
        events=["blend change: x"], memory_mb=1234.5, log_time_s=5e-324, version=SCHEMA_VERSION)


def test_every_field_round_trips_exactly_through_a_line():
    record = _full()
    unset = [f.name for f in dataclasses.fields(StepRecord) if getattr(record, f.name) == f.default]
    assert unset == ["version"]  # every other field differs from its default, so a dropped field would show
    again = StepRecord.from_json(json.loads(record.to_line()))
    assert again == record
    assert [repr(getattr(again, f.name)) for f in dataclasses.fields(StepRecord)] == \
        [repr(getattr(record, f.name)) for f in dataclasses.fields(StepRecord)]  # bit-exact floats, same types


def test_contract_keys_and_optional_fields_left_out_when_none():
    line = json.loads(_full().to_line())
    for key in ("step", "phase", "tokens", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s",
                "tflops_per_device", "mfu", "samples", "consumed_tokens", "val_loss", "version"):
        assert key in line, key
    assert line["val_loss"] == {"prose": 7.0000000001} and line["val_bpb"] == 1.1
    bare = dataclasses.replace(_full(), eval=None, events=None, loss_per_dataset=None, blend_weights=None, mfu=None)
    keys = set(json.loads(bare.to_line()))
    assert not keys & {"val_loss", "val_bpb", "val_bpb_per_dataset", "events", "loss_per_dataset", "blend_weights"}
    assert "mfu" in keys  # part of the contract: null without a peak, never missing
    partial = dataclasses.replace(_full(), eval=EvalRecord(loss_per_dataset={"web": 3.0}))
    assert "val_bpb" not in json.loads(partial.to_line())
    assert StepRecord.from_json(json.loads(partial.to_line())).eval == EvalRecord({"web": 3.0})


# A line as the trainer wrote it before records carried a version (the contract's version 1).
_V1_LINE = ('{"step": 3, "phase": "text", "tokens": 6144, "loss": 7.58, "lr": 0.002, "grad_norm": 0.1, '
            '"skipped": false, "step_time_s": 0.2, "data_time_s": 0.01, "tokens_per_s": 10240.0, '
            '"tflops_per_device": 0.03, "mfu": null, "samples": {"prose": 16}, "consumed_tokens": {"prose": 6144}, '
            '"val_loss": {"prose": 7.5, "web": 7.6}, "events": ["blend change: a"], "memory_mb": 900.0, '
            '"log_time_s": 0.001}')


def test_a_file_written_before_the_version_field_reads_as_version_1(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_V1_LINE + "\n")
    (record,) = read_records(tmp_path)
    assert record.version == 1 and record.step == 3 and record.mfu is None and record.loss_per_dataset is None
    assert record.eval == EvalRecord(loss_per_dataset={"prose": 7.5, "web": 7.6})
    assert record.events == ["blend change: a"] and record.samples == {"prose": 16}
    old = json.loads(_V1_LINE)
    assert {k: v for k, v in record.to_json().items() if k != "version"} == old  # same keys, same values


def test_older_lines_without_timings_read_with_defaults():
    old = {k: v for k, v in json.loads(_V1_LINE).items() if k not in ("data_time_s", "log_time_s", "memory_mb",
                                                                          "skipped")}
    record = StepRecord.from_json(old)
    assert (record.data_time_s, record.log_time_s, record.memory_mb, record.skipped) == (0.0, 0.0, None, False)


def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.jsonl; pass the run.dir"):
        read_records(tmp_path)
    path = tmp_path / "metrics.jsonl"
    path.write_text(_V1_LINE + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"metrics\.jsonl:2: not JSON"):
        read_records(tmp_path)
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(ConfigError, match=r"metrics\.jsonl:1: not a step record, missing phase, tokens, lr"):
        read_records(tmp_path)
    path.write_text(json.dumps({**json.loads(_V1_LINE), "version": SCHEMA_VERSION + 1}) + "\n")
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}"):
        read_records(tmp_path)


def test_records_file_appends_whole_lines_and_drops_steps_a_resume_redoes(tmp_path):
    records = [dataclasses.replace(_full(), step=s, tokens=s * 2048) for s in (1, 2, 3)]
    out = RecordsFile(tmp_path)
    for r in records:
        out.append(r)
    assert count_records(tmp_path) == 3  # line-buffered: a reader sees every finished step while the file is open
    out.close()
    assert read_records(tmp_path) == records
    resumed = RecordsFile(tmp_path, resumed_step=1)  # resumed from the checkpoint after step 1
    resumed.append(records[1])
    resumed.close()
    assert [r.step for r in read_records(tmp_path)] == [1, 2]
    assert count_records(tmp_path / "nowhere") == 0
