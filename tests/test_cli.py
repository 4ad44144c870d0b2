"""The `megacrystal` command as operators use it: info, train (one process and torchrun), one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "crystal-tiny.yaml")


def megacrystal(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "megacrystal", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=600)


def test_info_prints_the_7b_parameter_count():
    out = megacrystal("info", "--config", "configs/crystal-7b.yaml", "--world-size", "64")
    assert out.returncode == 0, out.stderr
    assert "6,575,278,720" in out.stdout
    assert "world 64 = tp 2 x pp 4 x dp 8" in out.stdout


@pytest.mark.parametrize("overrides, env, field", [
    (["--set", "parallel.tpp=2"], {}, "parallel.tpp: unknown key"),
    (["--set", "train.steps=many"], {}, "train.steps: input should be a valid integer"),
    (["--set", "model.num_heads=3"], {}, "model.num_heads: 3 does not divide model.hidden_size"),
    (["--set", "parallel.tp=8"], {}, "parallel.tp: 8 does not divide model.num_heads"),
    (["--set", "parallel.pp=3"], {}, "parallel.pp: pp x vpp = 3 does not divide model.num_layers"),
    (["--set", "parallel.tp=2"], {"WORLD_SIZE": "3"}, "world size 3 is not divisible by tp x pp = 2"),
])
def test_train_rejects_bad_input_in_one_line_before_starting(tmp_path, overrides, env, field):
    out = megacrystal("train", "--config", TINY, "--set", f"run.dir={tmp_path}/run", *overrides, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and lines[0].startswith("megacrystal: error:"), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize("overrides, message", [
    (["--set", "data.phases.warmup.tokens=5"], "unknown phase 'warmup'; data.phases has text, mixed, code"),
    (["--set", "data.phases.mixed.weights.rust=0.5"], "data.phases.mixed.weights.rust: unknown dataset"),
    (["--set", "data.phases.mixed.weights.web=-0.2", "--set", "data.phases.mixed.weights.prose=0.9"],
     "data.phases.mixed.weights.web: negative weight -0.2"),
    (["--set", "data.phases.mixed.weights.web=0.5"], "data.phases.mixed.weights: sum to 1.3, not 1"),
])
def test_bad_phase_overrides_fail_in_one_line(tmp_path, overrides, message):
    out = megacrystal("train", "--config", TINY, "--set", f"run.dir={tmp_path}/run", *overrides)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_renormalize_accepts_weights_not_summing_to_one(tmp_path):
    out = megacrystal("info", "--config", TINY, "--set", "data.phases.mixed.weights.web=0.5",
                      "--set", "data.renormalize=true")
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_damaged_or_foreign_datasets_fail_in_one_line(tmp_path, tiny_data):
    import shutil

    from megacrystal.data.tokenizer import train_tokenizer

    data = tmp_path / "data"
    shutil.copytree(tiny_data[1].split("=", 1)[1], data)
    (tmp_path / "other.txt").write_text("a different corpus entirely, for another tokenizer\n" * 200)
    other = train_tokenizer([tmp_path / "other.txt"], tmp_path / "other", 320)
    cases = [
        (["--set", "model.vocab_size=4096"], "prepared for vocabulary size 2048 but the tokenizer has 4096"),
        (["--set", f"data.tokenizer.model={other}"], "was tokenized with another tokenizer"),
    ]
    for overrides, message in cases:
        out = megacrystal("train", "--config", TINY, "--set", f"data.dir={data}", "--set",
                          f"run.dir={tmp_path}/run", *overrides)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    (data / "python-00000_train.idx").unlink()
    out = megacrystal("train", "--config", TINY, "--set", f"data.dir={data}", "--set", f"run.dir={tmp_path}/run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"dataset file {data}/python-00000_train.idx is missing; run `megacrystal prepare`" in out.stderr
    assert not (tmp_path / "run").exists()


# -- numeric flags: every one of every command refuses 0 / negatives / non-numbers at the parser, in one line ----
def _numeric_flags():
    """(command words, flag, type) for every option whose type is one of megacrystal.config.arguments."""
    import argparse

    from megacrystal.config import arguments
    from megacrystal.cli import _parser

    ours = {arguments.positive_int, arguments.nonnegative_int, arguments.positive_float, arguments.fraction}
    found, plain = [], []

    def walk(parser, words):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, words + [name])
            elif action.type in ours:
                found.append((words, action.option_strings[0], action.type))
            elif action.type in (int, float):
                plain.append((words, action.option_strings[0]))

    walk(_parser(), [])
    return found, plain


def test_no_numeric_flag_is_a_plain_int_or_float():
    found, plain = _numeric_flags()
    assert not plain, f"flags that accept 0 / negatives unchecked: {plain}"
    assert len(found) >= 20  # info, bench, export, import, score, launch slurm


@pytest.mark.parametrize("value", ["0", "-3", "banana", "1e999", "nan"])
def test_every_numeric_flag_rejects_bad_values_in_one_line(value, capsys):
    from megacrystal.config import arguments
    from megacrystal.cli import _parser

    found, _ = _numeric_flags()
    for words, flag, kind in found:
        if value == "0" and kind is arguments.nonnegative_int:
            continue  # 0 is valid there (--gpus-per-node 0: CPU nodes; --warmup 0; --max-requeues 0)
        if kind in (arguments.positive_int, arguments.nonnegative_int) and value in ("1e999", "nan"):
            value_here = "1.5"
        else:
            value_here = value
        with pytest.raises(SystemExit) as stop:
            _parser().parse_args([*words, flag, value_here])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("megacrystal ") and \
            f"argument {flag}" in err[0], (words, flag, err)
        assert "Traceback" not in "\n".join(err)


def test_bench_predict_with_zero_nodes_is_a_one_line_error():
    out = megacrystal("bench", "--config", TINY, "--predict", "--nodes", "0")
    assert out.returncode == 2 and out.stderr == ("megacrystal bench: error: argument --nodes: must be a positive "
                                                  "integer, got 0 (see megacrystal bench --help)\n"), out.stderr
    assert "Traceback" not in out.stderr


# -- warnings at the start: plans that are valid but probably not meant ------------------------------------------
def test_info_warns_of_a_warmup_longer_than_its_phase_and_a_phase_shorter_than_the_interval():
    out = megacrystal("info", "--config", TINY, "--set", "data.phases.code.lr.warmup_steps=200",
                      "--set", "checkpoint.interval=120")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("tokens per step") == 1  # the phase table once
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("megacrystal: warning:") for line in lines), out.stderr
    assert "data.phases.code.lr.warmup_steps = 200 is longer than phase code (100 steps)" in lines[0]
    assert "phase code has 100 steps, fewer than checkpoint.interval = 120" in lines[1]


def test_phase_overrides_say_where_they_take_effect_on_a_resumed_run():
    from megacrystal.config import load_config
    from megacrystal.schedule.checks import override_notes
    from megacrystal.schedule.from_config import plan_for

    plan = plan_for(load_config(TINY))  # text [0, 150), mixed [150, 300), code [300, 400)
    sets = ["data.phases.text.fim_rate=0.1", "data.phases.mixed.lr.peak=0.001", "data.phases.code.fim_rate=0.5",
            "train.log_interval=5"]
    notes = override_notes(sets, plan, resume_step=200)
    assert len(notes) == 3
    assert notes[0].startswith("warning: --set data.phases.text.fim_rate: phase text (steps 0-150) already "
                               "finished before the resumed step 200; this override changes nothing")
    assert "takes effect in phase mixed from step 200" in notes[1] and "first 50 steps ran without it" in notes[1]
    assert "takes effect when phase code starts, at step 300" in notes[2]
    assert override_notes(sets, plan, resume_step=None)[0].endswith("takes effect in phase text from step 0")


# -- quiet output ----------------------------------------------------------------------------------------------
def test_known_dependency_warnings_are_filtered_and_others_kept():
    import warnings

    from megacrystal.quiet import quiet_expected_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_expected_warnings()
        warnings.warn("`load_state_dict` is deprecated and will be removed in future versions.", FutureWarning)
        warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
        warnings.warn("something we did not expect", FutureWarning)
    assert [str(w.message) for w in caught] == ["something we did not expect"]


@pytest.mark.slow
def test_a_resumed_run_prints_nothing_on_stderr(synthetic_config, tmp_path):
    run = ["train", "--config", str(synthetic_config), "--set", f"run.dir={tmp_path}/run"]
    first = megacrystal(*run, "--set", "train.steps=2")
    assert first.returncode == 0 and first.stderr == "", first.stderr
    resumed = megacrystal(*run, "--set", "train.steps=3")  # loads through torch.distributed.checkpoint
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    assert resumed.stderr == "", resumed.stderr


def test_a_closed_stdout_pipe_is_no_traceback():
    """`megacrystal info ... | head -1`: the reader is gone before the command prints (its read end closed)."""
    proc = subprocess.Popen([sys.executable, "-m", "megacrystal", "info", "--config", "configs/crystal-7b.yaml"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err
