"""Packaging for melo_fast.

Install torch==2.13.0 first and then this package without build isolation
(`pip install --no-build-isolation -e .`), so pip never resolves a different (CUDA) torch.
"""

from setuptools import find_packages, setup

setup(
    name="melo_fast",
    version="0.1.0",
    description="Fast MELO (neuron-indexed dynamic LoRA) model editing for Hugging Face models",
    packages=find_packages(include=["melo_fast", "melo_fast.*"]),
    package_data={"melo_fast": ["eval/data/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "transformers>=4.40",
        "triton",
        "safetensors",
        "tqdm",
        "numpy",
        "ninja",
        "pybind11",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "ruff", "sentencepiece"],
        "bench": ["pytest-benchmark", "peft", "matplotlib"],
        "demo": ["matplotlib"],
    },
)
