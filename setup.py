"""Packaging for melo_fast.

Install torch==2.13.0 first and then this package without build isolation
(`pip install --no-build-isolation -e .`), so pip never resolves a different (CUDA) torch.

The C++ CPU extension `melo_fast._C` (csrc/) is optional: it is built with torch's
cpp_extension (ninja, OpenMP) when possible; if the build fails, or `MELO_FAST_NO_EXT=1` is set,
installation continues without it and melo_fast uses its torch backend on CPU.
"""

import os

from setuptools import find_packages, setup


def _extension_build():
    """(ext_modules, cmdclass) for the optional C++ extension; empty when it is skipped."""
    if os.environ.get("MELO_FAST_NO_EXT") == "1":
        print("melo_fast: MELO_FAST_NO_EXT=1 set: not building the C++ extension (the torch backend will be used)")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as err:  # noqa: BLE001 - any failure means: no extension, install anyway
        print(f"melo_fast: torch is not importable ({err}): not building the C++ extension")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that reports a failed compile in one line and carries on without it."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - compiler, ninja or OpenMP missing: all optional
                print(f"melo_fast: C++ extension build failed, continuing without it (torch backend on CPU): {err}")
                self.extensions = []  # nothing to copy in place or to put in the wheel

    # Portable flags: -O3 and no -march=native; the kernels pick AVX2/AVX-512 code paths at run time.
    flags = ["-O3", "-fopenmp", "-Wno-psabi"]  # psabi: vector types in always-inline helpers
    extension = CppExtension(
        "melo_fast._C",
        sources=["csrc/bindings.cpp", "csrc/vecdb_search.cpp", "csrc/block_lora.cpp"],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

setup(
    name="melo_fast",
    version="0.1.0",
    description="Fast MELO (neuron-indexed dynamic LoRA) model editing for Hugging Face models",
    packages=find_packages(include=["melo_fast", "melo_fast.*"]),
    package_data={"melo_fast": ["eval/data/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
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
