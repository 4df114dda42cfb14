"""Build of melo_fast's optional C++ CPU extension ``melo_fast._C`` (csrc/); the project's metadata is
in pyproject.toml.

Install torch==2.13.0 first and then this package without build isolation
(`pip install --no-build-isolation -e .`), so pip never resolves a different (CUDA) torch.

The extension is built with torch's cpp_extension (ninja if installed, OpenMP) when possible. For a
user, a failed build (no compiler, no OpenMP, no importable torch) is not an error: installation
continues without it and melo_fast uses its torch backend on CPU. In CI (`CI=true`) the same failure
stops the install, so a broken build cannot turn into skipped tests. `MELO_FAST_NO_EXT=1` skips the
build on purpose (the test suite then fails under CI, which requires the extension).
"""

import os

from setuptools import setup


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_or_fail(message: str) -> None:
    """Report a build that cannot happen: fatal in CI, one line for a user."""
    if _in_ci():
        raise SystemExit(f"melo_fast: {message}; CI=true requires the C++ extension")
    print(f"melo_fast: {message}; installing without the C++ extension (the torch backend will be used)")


def _extension_build():
    """(ext_modules, cmdclass) for the optional C++ extension; empty when it is skipped."""
    if os.environ.get("MELO_FAST_NO_EXT") == "1":
        print("melo_fast: MELO_FAST_NO_EXT=1 set: not building the C++ extension (the torch backend will be used)")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as err:  # noqa: BLE001 - any failure means: no extension
        _skip_or_fail(f"torch is not importable ({err}), so the C++ extension cannot be built")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that reports a failed compile in one line and carries on without it (outside CI)."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - compiler, ninja or OpenMP missing: all optional
                _skip_or_fail(f"the C++ extension build failed ({err})")
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

setup(ext_modules=ext_modules, cmdclass=cmdclass)
