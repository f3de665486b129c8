"""PyTorch models in a worker: a ``torch.export`` program (``.pt2``), a TorchScript file, or a
whole ``nn.Module`` saved with cloudpickle, scored under ``eval()`` and ``torch.inference_mode()``.

Inputs and outputs follow the Keras rules: a batch is a 2-D array (integers stay integers, for
token ids; numbers become the model's float type), and the output is one array per row, or a
dict of them (a STRUCT) for a model returning a tuple or a dict. The model runs on the GPU Ray
gave the worker (``udf_engine.models.devices.torch_device``), else on the CPU with the worker's
share of the cores, in ``dtype`` (float32; float16 and bfloat16 halve the memory).

Example (inside a worker, or in-process for a test):
    >>> model = load_torch(Path("m.pt2"), "m.pt2", {"dtype": "float32"}, threads=1, num_gpus=0)   # doctest: +SKIP
    >>> model.predict(np.zeros((2, 4))).shape, model.load_info["device"]                  # doctest: +SKIP
    ((2, 3), 'cpu')
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from udf_engine.errors import ModelError
from udf_engine.models.devices import torch_device
from udf_engine.settings import Option

# The float types a torch or transformers model may run in (option dtype).
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_OPTION = Option(
    "dtype", "float32", str, "torch and text models: the float type the model runs in (`float16`/`bfloat16` halve its memory)",
    choices=DTYPES,
)
TORCH_OPTIONS: tuple[Option, ...] = (DTYPE_OPTION,)


def torch_setup(*, dtype: str, threads: int, num_gpus: float) -> tuple[Any, Any]:
    """The worker's torch device and dtype, with torch's CPU threads set to the worker's share."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = torch_device(num_gpus, os.environ, cuda_available=torch.cuda.is_available())
    return torch.device(device), getattr(torch, dtype)


def to_numpy(output: Any) -> Any:
    """A model's output as NumPy: half floats widened to float32; a tuple or list of tensors becomes
    a dict ``out0``, ``out1``, ... (a STRUCT), a dict keeps its keys."""
    import torch

    if isinstance(output, dict):
        return {str(k): to_numpy(v) for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return {f"out{i}": to_numpy(v) for i, v in enumerate(output)}
    if isinstance(output, torch.Tensor):
        if output.is_floating_point() and output.dtype != torch.float64:
            output = output.float()
        return output.detach().cpu().numpy()
    return np.asarray(output)


class TorchModel:
    """A loaded PyTorch model behind a Keras-like ``predict`` (see the module's docstring)."""

    def __init__(self, module: Any, *, device: Any, dtype: Any, width: int | None, saved_as: str) -> None:
        self.module, self.device, self.dtype = module, device, dtype
        if width is not None:
            self.input_shape = (None, width)
        self.load_info = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "saved_as": saved_as}

    def predict(self, batch: Any) -> Any:
        import torch

        array = np.asarray(batch)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensor = tensor.to(self.device, torch.int64 if array.dtype.kind in "iub" else self.dtype)
        with torch.inference_mode():
            return to_numpy(self.module(tensor))


def load_torch(path: Path, name: str, options: Mapping[str, Any], *, threads: int, num_gpus: float) -> TorchModel:
    """Load a ``.pt2`` export, a TorchScript archive or a cloudpickled ``nn.Module`` (``options``: TORCH_OPTIONS' values)."""
    import torch

    device, torch_dtype = torch_setup(dtype=options["dtype"], threads=threads, num_gpus=num_gpus)
    try:
        if path.suffix == ".pt2":
            program = torch.export.load(str(path))
            module, saved_as, width = program.module(), "torch.export", _exported_width(program)
        elif _is_torchscript(path):
            module, saved_as = torch.jit.load(str(path), map_location="cpu"), "TorchScript"
            width = linear_width(module)
        else:
            import cloudpickle

            module, saved_as = cloudpickle.loads(path.read_bytes()), "pickled nn.Module"
            if not isinstance(module, torch.nn.Module):
                raise ModelError(f"torch model {name!r} is a pickled {type(module).__name__}, not a torch.nn.Module")
            width = linear_width(module)
        return torch_model(module, device=device, dtype=torch_dtype, width=width, saved_as=saved_as)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure is a model problem for the user
        raise ModelError(f"cannot load torch model {name!r}: {err}") from None


def torch_model(module: Any, *, device: Any, dtype: Any, width: int | None, saved_as: str) -> TorchModel:
    """A loaded module in ``eval()`` mode, on ``device`` in ``dtype``, behind ``predict``."""
    import torch

    try:
        module.eval()
    except NotImplementedError:  # a torch.export program's module: traced in the mode it was exported in
        pass
    module = module.to(device) if dtype == torch.float32 else module.to(device, dtype)
    return TorchModel(module, device=device, dtype=dtype, width=width, saved_as=saved_as)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding the scripted code (torch.save's zip holds only data.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in f"/{name}" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def linear_width(module: Any) -> int | None:
    """The inputs a row has, when the model's first layer is a Linear one that says so."""
    for sub in module.modules():
        width = getattr(sub, "in_features", None)
        if isinstance(width, int):
            return width
    return None


def _exported_width(program: Any) -> int | None:
    """The width of an exported program's one 2-D input, as it was exported."""
    inputs = [node for node in program.graph.nodes if node.op == "placeholder" and node.name in program.graph_signature.user_inputs]
    if len(inputs) != 1:
        return None
    shape = getattr(inputs[0].meta.get("val"), "shape", ())
    return int(shape[1]) if len(shape) == 2 and str(shape[1]).isdigit() else None
