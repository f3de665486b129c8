"""Where a worker's model runs: on a GPU when the worker reserved one and Ray made one visible.

Ray sets ``CUDA_VISIBLE_DEVICES`` in a worker to the GPUs it assigned it (logical GPUs
included), so a worker registered with ``num_gpus`` > 0 finds its share there. The loaders
ask these pure functions, which a test can drive with any environment, no GPU needed.

Example:
    >>> gpu = {"CUDA_VISIBLE_DEVICES": "1"}
    >>> onnx_providers(1, gpu, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    ['CUDAExecutionProvider', 'CPUExecutionProvider']
    >>> onnx_providers(1, gpu, ["CPUExecutionProvider"]), xgboost_device(0.5, gpu, cuda_built=True)
    (['CPUExecutionProvider'], 'cuda')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def gpu_visible(num_gpus: float, environ: Mapping[str, str]) -> bool:
    """True when the worker reserved GPUs and Ray made some visible to it.

    Example:
        >>> [gpu_visible(n, {"CUDA_VISIBLE_DEVICES": v}) for n, v in [(1, "0"), (1, ""), (0, "0")]]
        [True, False, False]
    """
    return num_gpus > 0 and bool(environ.get("CUDA_VISIBLE_DEVICES", "").strip())


def onnx_providers(num_gpus: float, environ: Mapping[str, str], available: Sequence[str]) -> list[str]:
    """ONNX Runtime's execution providers for a worker: CUDA first when it has a GPU and this
    onnxruntime build offers CUDA, then the CPU (which runs what CUDA cannot)."""
    if gpu_visible(num_gpus, environ) and CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def xgboost_device(num_gpus: float, environ: Mapping[str, str], *, cuda_built: bool) -> str:
    """XGBoost's ``device`` for a worker: "cuda" (the first visible GPU) when it has a GPU and
    this xgboost build has CUDA (``xgboost-cpu`` has not), else "cpu"."""
    return "cuda" if cuda_built and gpu_visible(num_gpus, environ) else "cpu"


def torch_device(num_gpus: float, environ: Mapping[str, str], *, cuda_available: bool) -> str:
    """PyTorch's device for a worker: "cuda:0" (the first GPU Ray made visible to it, whichever card
    that is; workers with fractional GPUs on one card share it) when it has a GPU and torch sees
    CUDA, else "cpu".

    Example:
        >>> gpu = {"CUDA_VISIBLE_DEVICES": "1"}
        >>> [torch_device(n, gpu, cuda_available=cuda) for n, cuda in [(0.5, True), (1, False), (0, True)]]
        ['cuda:0', 'cpu', 'cpu']
    """
    return "cuda:0" if cuda_available and gpu_visible(num_gpus, environ) else "cpu"
