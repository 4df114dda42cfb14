"""The backends of the two ops: one protocol, and a registry from a backend's name to its loader.

Every backend implements ``vecdb_search`` and ``block_lora`` with the semantics documented in
:mod:`melo_fast.ops` (which validates the tensors before a backend sees them):

- ``reference`` (:mod:`melo_fast.ops.reference`): plain loops over DESIGN §1's rules; the test oracle;
- ``torch`` (:mod:`melo_fast.ops.torch_ops`): vectorized torch; runs anywhere, and ``torch.compile``
  traces it as any torch code;
- ``cpp`` (:mod:`melo_fast.ops.cpp`): the C++ CPU extension, when it was built;
- ``triton`` (:mod:`melo_fast.ops.triton`): fused Triton kernels, for CUDA tensors.

The two compiled ones are :class:`~melo_fast.ops.custom_ops.KernelBackend` objects, whose kernels run
as torch custom ops where ``torch.compile`` or autograd needs to see them. Each backend's module has a
``load()`` that imports what the backend needs on first use and raises ImportError saying why it cannot
run here, so ``melo_fast`` always imports.
"""

from __future__ import annotations

import importlib
import logging

import torch

BACKENDS = ("reference", "torch", "cpp", "triton")
_MODULES = {"reference": "reference", "torch": "torch_ops", "cpp": "cpp", "triton": "triton"}
_PREFERRED = {"cuda": "triton", "cpu": "cpp"}  # the automatic choice per device type, if it can run


class Backend:
    """The two ops of one backend (:func:`melo_fast.ops.vecdb_search`, :func:`melo_fast.ops.block_lora`
    give shapes and semantics; shapes, dtypes and devices are validated before a backend is called).

    ``block_lora`` is out of place and differentiable in ``x``, ``A``, ``B`` and ``base``.
    ``block_lora_inplace`` writes the same values into ``base`` and returns it; this default computes
    out of place and copies, and a backend with an in-place kernel overrides it. It is called only when
    no gradient is needed and ``base`` shares no memory with the inputs.
    """

    name: str

    def vecdb_search(self, queries, centers, radii, point_offsets, points, point_blocks) -> torch.Tensor:
        raise NotImplementedError

    def block_lora(self, x, A, B, block_ids, scale: float, base) -> torch.Tensor:
        raise NotImplementedError

    def block_lora_inplace(self, x, A, B, block_ids, scale: float, base) -> torch.Tensor:
        result = self.block_lora(x, A, B, block_ids, scale, base)
        if result is not base:
            base.copy_(result)
        return base

    def __repr__(self) -> str:
        return f"<melo_fast {self.name} backend>"


def load(name: str) -> Backend:
    """The backend called ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
        ImportError: the backend cannot run on this machine (the message says why).
    """
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or None (automatic)")
    return importlib.import_module(f"melo_fast.ops.{_MODULES[name]}").load()


def backend_status() -> dict[str, str]:
    """For each backend: ``"available"`` or the reason it cannot be used on this machine."""
    status = {}
    for name in BACKENDS:
        try:
            load(name)
            status[name] = "available"
        except Exception as err:  # noqa: BLE001 - the reason is the answer
            status[name] = f"unavailable: {err}"
    return status


_automatic: dict[str, str] = {}  # device type -> the backend chosen for it, once per process
_loaded: dict[str, Backend] = {}  # name -> what its last load gave


def resolve(backend: str | None, device: torch.device) -> Backend:
    """The backend that runs an op on ``device``: ``backend``, or the fastest one for the device (None).

    Automatic: triton on CUDA, cpp on CPU, the torch backend where those cannot run (chosen once per
    device type and process; a CPU without the extension logs why, once). An explicitly named backend
    is loaded on every eager call, so one that stops being usable says so.

    Under ``torch.compile`` loading cannot be traced (it imports modules and reads the environment):
    the traced graph uses the backend an eager call resolved for the same name or device type
    (``melo_fast.patch`` resolves the model's), and RuntimeError if none did.
    """
    if torch.compiler.is_compiling():
        name = backend if backend is not None else _automatic.get(device.type)
        if name not in _loaded:
            raise RuntimeError(
                f"melo_fast: no op backend was resolved for {device.type} tensors before torch.compile traced "
                "the model; run it once without torch.compile first"
            )
        return _loaded[name]
    if backend is not None:
        _loaded[backend] = load(backend)
        return _loaded[backend]
    if device.type not in _automatic:
        _automatic[device.type] = _automatic_choice(device.type)
    return _loaded[_automatic[device.type]]


def _automatic_choice(device_type: str) -> str:
    preferred = _PREFERRED.get(device_type)
    if preferred is not None:
        try:
            _loaded[preferred] = load(preferred)
            return preferred
        except Exception as err:  # noqa: BLE001 - absent compiled backend: fall back, never crash
            if preferred == "cpp":  # once per process (the choice is kept): say why CPU ops are slower
                logging.getLogger("melo_fast.ops").warning(
                    "melo_fast: C++ CPU backend unavailable (%s); using the torch backend on CPU", err
                )
    _loaded["torch"] = load("torch")
    return "torch"
