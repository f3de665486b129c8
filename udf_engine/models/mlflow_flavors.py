"""MLflow's torch flavors run as rayudf's own torch and text models.

An MLflow model directory logged with ``mlflow.transformers``, ``mlflow.sentence_transformers`` or
``mlflow.pytorch`` is loaded with that flavor's own loader, then run as the ``transformers``,
``sentence_transformers`` or ``torch`` kind runs the same model: texts tokenized once and batched
by tokens, the same SQL types, the GPU Ray gave the worker. A ``transformers`` model whose task
the kind does not run is left to MLflow's pyfunc, as is every other flavor.

Example (inside a worker, or in-process for a test):
    >>> flavor_of(Path("mlruns/0/models/m-1/artifacts"))                        # doctest: +SKIP
    'transformers'
    >>> defaults = {opt.name: opt.default for opt in MLFLOW_TEXT_OPTIONS}
    >>> load_flavor(Path("mlruns/0/models/m-1/artifacts"), "transformers", "clf", defaults, threads=1, num_gpus=0)  # doctest: +SKIP
    <udf_engine.models.text.TransformersModel object at 0x...>
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from udf_engine.errors import ModelError
from udf_engine.models.generation import GENERATION_OPTIONS
from udf_engine.models.text import (
    FEATURE_EXTRACTION,
    TASKS,
    TEXT_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    TRANSFORMERS_OPTIONS,
    sentence_embedder,
    transformers_model,
)
from udf_engine.models.torch_models import linear_width, torch_model, torch_setup

FLAVORS = ("transformers", "sentence_transformers", "pytorch")  # the first of these a model has is the one it runs as
# The text options an MLflow text model takes (its task is the one it was logged with).
MLFLOW_TEXT_OPTIONS = tuple(opt for opt in TRANSFORMERS_OPTIONS if opt.name != "task" and opt not in GENERATION_OPTIONS)
# Tasks MLflow (and Transformers' pipelines) name otherwise.
_TASK_ALIASES = {"sentiment-analysis": TEXT_CLASSIFICATION, "ner": TOKEN_CLASSIFICATION}


def flavor_of(path: Path) -> str | None:
    """The torch flavor an MLflow model directory runs as here, if it has one (else: pyfunc)."""
    from mlflow.models import Model

    flavors = Model.load(str(path)).flavors
    flavor = next((name for name in FLAVORS if name in flavors), None)
    if flavor == "transformers" and _task(flavors[flavor]) is None:
        return None  # a task the transformers kind does not run (generation, summarization, ...): pyfunc runs it
    return flavor


def _task(conf: Mapping[str, Any]) -> str | None:
    task = str(conf.get("task") or "")
    task = _TASK_ALIASES.get(task, task)
    return task if task in TASKS else None


def load_flavor(path: Path, flavor: str, name: str, options: Mapping[str, Any], *, threads: int, num_gpus: float) -> Any:
    """Load ``path`` with ``flavor``'s own MLflow loader and wrap it as the matching kind's model."""
    import mlflow

    device, dtype = torch_setup(dtype=options["dtype"], threads=threads, num_gpus=num_gpus)
    try:
        if flavor == "pytorch":
            import mlflow.pytorch

            module = mlflow.pytorch.load_model(str(path), map_location="cpu")
            width = _signature_width(path) or linear_width(module)
            return torch_model(module, device=device, dtype=dtype, width=width, saved_as="MLflow pytorch")
        if flavor == "sentence_transformers":
            import mlflow.sentence_transformers

            model = mlflow.sentence_transformers.load_model(str(path))
            return sentence_embedder(model, options, device=device, dtype=dtype, task_from="MLflow sentence_transformers")
        import mlflow.transformers

        parts = mlflow.transformers.load_model(str(path), return_type="components")
        task = _task(parts)
        model = parts["model"].to(device) if options["dtype"] == "float32" else parts["model"].to(device, dtype)
        return transformers_model(model.eval(), parts["tokenizer"], task or FEATURE_EXTRACTION, {**options, "task": task},
                                  name=name, task_from="MLflow transformers", device=device)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - the flavor's loader may raise anything
        raise ModelError(f"cannot load MLflow {flavor} model {name!r}: {type(err).__name__}: {err}") from None


def _signature_width(path: Path) -> int | None:
    """The width of a tensor signature's one 2-D input, when the model was logged with one."""
    from mlflow.models import Model

    signature = Model.load(str(path)).signature
    inputs = signature.inputs if signature is not None else None
    if inputs is None or not inputs.is_tensor_spec() or len(inputs.inputs) != 1:
        return None
    shape = inputs.inputs[0].shape
    return int(shape[1]) if len(shape) == 2 and shape[1] > 0 else None
