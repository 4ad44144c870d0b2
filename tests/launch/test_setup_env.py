"""launch/setup_env.sh --dry-run: the index, versions and commands of each environment, resolved without installing
anything. The CUDA builds of torch 2.13.0 are those of pytorch/pytorch's RELEASE.md (12.6, 13.0, 13.2), each under
download.pytorch.org/whl/cu<major><minor>."""
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "setup_env.sh"


def _run(*args: str, venv: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "MEGACRYSTAL_VENV": str(venv)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def _lines(out: str) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        table.setdefault(key, []).append(value)
    return table


@pytest.mark.parametrize("args, env, cuda", [
    (["--cuda"], {}, "13.0"),  # the default: torch 2.13's stable CUDA 13.0
    (["--cuda", "12.6"], {}, "12.6"),
    (["--cuda=13.2"], {}, "13.2"),
    ([], {"MEGACRYSTAL_CUDA": "12.6"}, "12.6"),  # the environment variable instead of the flag
])
def test_cuda_dry_run_names_the_cuda_build_of_the_pinned_torch_and_installs_nothing(tmp_path, args, env, cuda):
    venv = tmp_path / "venv"
    out = _run(*args, "--dry-run", venv=venv, env=env)
    assert out.returncode == 0, out.stderr
    tag = "cu" + cuda.replace(".", "")
    table = _lines(out.stdout)
    assert table["torch"] == [f"torch==2.13.0+{tag} (CUDA {cuda}) from https://download.pytorch.org/whl/{tag}"]
    assert table["deepspeed"] == ["0.19.8"]
    assert table["run"][0] == (f"pip install 'torch==2.13.0+{tag}' --index-url https://download.pytorch.org/whl/"
                               f"{tag} --extra-index-url https://pypi.org/simple")
    assert table["run"][2] == f"pip install -e '{ROOT}[test]'"
    assert "transformer-engine" not in table and "apex" not in table  # optional extras only when asked
    assert not venv.exists()


def test_gpu_extras_resolve_to_versions_that_fit_the_pinned_torch_and_megatron_core(tmp_path):
    out = _run("--cuda", "13.0", "--te", "--apex", "--dry-run", venv=tmp_path / "venv")
    assert out.returncode == 0, out.stderr
    table = _lines(out.stdout)
    assert table["transformer-engine"] == ["2.11.0 (core_cu13)"]  # megatron-core 0.16.1: >=2.9.0a0,<2.12.0
    assert "pip install --no-build-isolation 'transformer_engine[pytorch,core_cu13]==2.11.0'" in table["run"]
    assert any(r.startswith("APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation 'apex @ git+")
               for r in table["run"])
    out = _run("--cuda", "12.6", "--te", "--dry-run", venv=tmp_path / "venv")
    assert "transformer_engine[pytorch,core_cu12]==2.11.0" in out.stdout  # the core library for CUDA 12
    setup_py = (ROOT / "setup.py").read_text()  # the extras pin the same versions
    assert '"gpu": ["transformer-engine[pytorch,core_cu13]==2.11.0"]' in setup_py
    assert '"gpu-cu12": ["transformer-engine[pytorch,core_cu12]==2.11.0"]' in setup_py


def test_deepspeed_ops_are_compiled_only_where_nvcc_is(tmp_path):
    bare = tmp_path / "bin"  # bash and coreutils, but no nvcc
    bare.mkdir()
    for tool in ("bash", "dirname", "cat", "sha256sum", "cut", "sed", "printf"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found.startswith("/"):
            (bare / tool).symlink_to(found)
    out = _run("--cuda", "--dry-run", venv=tmp_path / "venv", env={"PATH": str(bare)})
    assert out.returncode == 0, out.stderr
    assert "run: DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed==0.19.8'" in out.stdout
    assert "nvcc: not found" in out.stdout
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    out = _run("--cuda", "--dry-run", venv=tmp_path / "venv", env={"PATH": str(bare), "CUDA_HOME": str(nvcc.parents[1])})
    assert "run: DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 pip install --no-build-isolation 'deepspeed==0.19.8'" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--cuda", "11.8"], "--cuda 11.8: torch 2.13.0 ships CUDA builds for 12.6, 13.0, 13.2 only"),
    (["--te"], "--te and --apex are GPU extras; add --cuda"),
    (["--gpu"], "unknown option --gpu"),
])
def test_bad_options_fail_in_one_line_before_any_work(tmp_path, args, message):
    out = _run(*args, "--dry-run", venv=tmp_path / "venv")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "venv").exists()


def test_the_cpu_default_is_unchanged_and_an_up_to_date_cpu_env_is_left_alone(tmp_path):
    out = _run("--dry-run", venv=tmp_path / "venv")
    assert out.returncode == 0, out.stderr
    assert _lines(out.stdout)["run"] == ["pip install 'torch==2.13.0'",
                                         "DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed==0.19.8'",
                                         f"pip install -e '{ROOT}[test]'"]
    # The CPU stamp is still the bare sha256 of setup.py + setup_env.sh: an env built by it is not rebuilt.
    venv = tmp_path / "venv"
    venv.mkdir()
    digest = hashlib.sha256((ROOT / "setup.py").read_bytes() + SCRIPT.read_bytes()).hexdigest()
    (venv / ".megacrystal-stamp").write_text(digest + "\n")
    out = _run(venv=venv)
    assert out.returncode == 0 and out.stderr == "" and sorted(p.name for p in venv.iterdir()) == [".megacrystal-stamp"]


@pytest.mark.parametrize("stamp_mode, args, cleared", [
    ("", [], False),  # a CPU env after a setup.py change: installed over, as before
    ("", ["--cuda"], True),  # CPU -> CUDA: pip would keep the CPU torch 2.13.0, so start afresh
    (" cuda 13.0", [], True),  # CUDA -> CPU
    (" cuda 13.0", ["--cuda", "13.0"], False),
    (" cuda 13.0", ["--cuda", "12.6"], True),
    (" cuda 13.0", ["--cuda", "13.0", "--te"], True),
])
def test_an_env_built_for_another_torch_is_recreated(tmp_path, stamp_mode, args, cleared):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".megacrystal-stamp").write_text(f"an-older-digest{stamp_mode}\n")
    record = tmp_path / "venv-args"
    python = tmp_path / "python"  # stands in for python3.11 and stops the script at `python -m venv`
    python.write_text(f'#!/bin/sh\necho "$@" > {record}\nexit 3\n')
    python.chmod(0o755)
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"  # --te needs a CUDA compiler before it does anything
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    out = _run(*args, venv=venv, env={"PYTHON": str(python), "CUDA_HOME": str(nvcc.parents[1])})
    assert out.returncode == 3, out.stderr
    assert record.read_text().split() == ["-m", "venv", *(["--clear"] if cleared else []), str(venv)]
