"""megacrystal: distributed pretraining of Crystal-family LLMs on megatron-core."""
from setuptools import find_packages, setup

# torch is pinned to the CPU wheel that launch/setup_env.sh installs first; a looser pin here would
# let pip resolve a multi-GB CUDA build on a fresh machine.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",  # newest release that supports Python 3.11
    "deepspeed==0.19.8",  # an sdist: launch/setup_env.sh builds it without isolation and without C++ ops
    "numpy>=2.0,<2.5",
    "psutil==7.2.2",  # undeclared runtime dependency of megatron-core's dist_checkpointing
    "pydantic==2.14.3",
    "PyYAML==6.0.3",
    "sentencepiece==0.2.3",
    "protobuf==7.36.2",  # reads a sentencepiece model's normalizer (its model_pb2 needs >= 7.36.1)
    "tensorboard==2.21.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "safetensors==0.8.0",  # Hugging Face export
    "zstandard==0.25.0",  # SlimPajama's .jsonl.zst (streaming decompressobj, detects truncation)
    "pyarrow==26.0.1",  # Parquet (StarCoder) and Hugging Face save_to_disk arrow files
    "orjson==3.13.0",  # JSONL records at ~1.7x the stdlib parser's speed (records.load_json)
    "datasketch==2.0.0",  # MinHash LSH near-duplicate removal (affine32 scheme needs 2.0)
]

setup(
    name="megacrystal",
    version="0.1.0",
    description="Distributed pretraining of LLM360 Crystal-family models on megatron-core",
    packages=find_packages(include=["megacrystal", "megacrystal.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==9.2.0", "hypothesis==6.170.15",
                 "datasets==5.2.0"],  # writes a real save_to_disk directory for the reader's test
        # Used only when a GPU is present; never required on the CPU path. `bash launch/setup_env.sh --cuda --te`
        # installs the one for its CUDA (with --no-build-isolation: its torch extension compiles against the CUDA
        # torch already there). 2.11.0 is the newest Transformer Engine megatron-core 0.16.1 declares
        # (>=2.9.0a0,<2.12.0). NVIDIA apex is not on PyPI: `setup_env.sh --apex` builds it from a pinned commit.
        "gpu": ["transformer-engine[pytorch,core_cu13]==2.11.0"],  # CUDA 13.0 / 13.2 builds of torch
        "gpu-cu12": ["transformer-engine[pytorch,core_cu12]==2.11.0"],  # CUDA 12.6 builds of torch
    },
    entry_points={"console_scripts": ["megacrystal = megacrystal.cli:main"]},
)
