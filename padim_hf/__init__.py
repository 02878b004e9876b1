"""padim_hf: PaDiM anomaly detection, native to the Hugging Face Hub.

The front door: everything the command line does is one function here.

```python
from padim_hf import build_model, evaluate_padim, export_model, fit_padim, load_split, predict_images, push, save_fitted

model = fit_padim(build_model("padim-lite0-offline"), training_split("path/to/bottle"))   # good images only
save_fitted(model, "models/bottle")
metrics = evaluate_padim(model, load_split("path/to/bottle", "test"), calibration=0.5)
predict_images("models/bottle", ["images/"], "predictions/")                     # heatmaps + predictions.csv
export_model("models/bottle", "models/bottle/onnx", "onnx")
push("models/bottle", "my-org/padim-bottle")
```

`import padim_hf` is cheap (the command line starts in well under a second): names are imported on first use
(PEP 562 `__getattr__`, as transformers does). The first use of any of them also registers PaDiM with transformers'
Auto classes and the "anomaly-detection" pipeline (`register()`).
"""

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> (submodule, attribute in it).
_EXPORTS: dict[str, tuple[str, str]] = {
    # the model, as transformers sees it
    "PadimConfig": ("configuration_padim", "PadimConfig"),
    "PadimModel": ("modeling_padim", "PadimModel"),
    "PadimOutput": ("modeling_padim", "PadimOutput"),
    "NotFittedError": ("modeling_padim", "NotFittedError"),
    "PadimImageProcessor": ("image_processing_padim", "PadimImageProcessor"),
    "AnomalyDetectionPipeline": ("pipeline_padim", "AnomalyDetectionPipeline"),
    "ANOMALY_DETECTION_TASK": ("pipeline_padim", "TASK"),
    "PatchStatistics": ("gaussian", "PatchStatistics"),
    # fit
    "build_model": ("fit", "build_model"),
    "fit_padim": ("fit", "fit_padim"),
    "save_fitted": ("fit", "save_fitted"),
    "training_split": ("fit", "training_split"),
    "calibrate": ("calibration", "calibrate"),
    "describe_calibration": ("calibration", "describe_calibration"),
    "make_accelerator": ("fit", "make_accelerator"),
    # data, evaluation, prediction, export, Hub
    "load_split": ("data", "load_split"),
    "load_fitted": ("evaluate", "load_fitted"),
    "evaluate_padim": ("evaluate", "evaluate_padim"),
    "save_evaluation": ("evaluate", "save_evaluation"),
    "EvaluationResult": ("evaluate", "EvaluationResult"),
    "predict_images": ("predict", "predict_images"),
    "export_model": ("export", "export"),
    "push": ("hub", "push"),
    "push_model": ("hub", "push_model"),
    "HubPushError": ("hub", "HubPushError"),
    "run_benchmark": ("benchmark", "run_benchmark"),
    "run_sweep": ("sweep", "run_sweep"),
    "make_demo_dataset": ("demo", "make_demo_dataset"),
}

_registered = False


def register() -> None:
    """Registers PaDiM with transformers: `AutoConfig` / `AutoModel` / `AutoImageProcessor` for model type "padim"
    and `pipeline("anomaly-detection")`, without `trust_remote_code`. Idempotent; the first use of any name of
    this package does it, so call it only when you use transformers' Auto classes or `pipeline` and nothing else.

    Example:

    ```python
    import padim_hf
    from transformers import pipeline

    padim_hf.register()
    detector = pipeline("anomaly-detection", model="my-org/padim-bottle")
    ```
    """
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_padim import PadimConfig
    from .image_processing_padim import PadimImageProcessor
    from .modeling_padim import PadimModel
    from .pipeline_padim import TASK, AnomalyDetectionPipeline

    AutoConfig.register(PadimConfig.model_type, PadimConfig, exist_ok=True)
    AutoModel.register(PadimConfig, PadimModel, exist_ok=True)
    AutoImageProcessor.register(
        PadimConfig, image_processor_classes={"torchvision": PadimImageProcessor}, exist_ok=True
    )
    # save_pretrained writes the code files and `auto_map`, so `trust_remote_code=True` works without this package.
    PadimConfig.register_for_auto_class()
    PadimModel.register_for_auto_class("AutoModel")
    PadimImageProcessor.register_for_auto_class("AutoImageProcessor")
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=AnomalyDetectionPipeline, pt_model=AutoModel, type="image")
    _registered = True


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'padim_hf' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    register()
    value = getattr(importlib.import_module(f".{module_name}", __name__), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static type checkers and IDEs see the real names
    from .benchmark import run_benchmark
    from .calibration import calibrate, describe_calibration
    from .configuration_padim import PadimConfig
    from .data import load_split
    from .demo import make_demo_dataset
    from .evaluate import EvaluationResult, evaluate_padim, load_fitted, save_evaluation
    from .export import export as export_model
    from .fit import build_model, fit_padim, make_accelerator, save_fitted, training_split
    from .gaussian import PatchStatistics
    from .hub import HubPushError, push, push_model
    from .image_processing_padim import PadimImageProcessor
    from .modeling_padim import NotFittedError, PadimModel, PadimOutput
    from .pipeline_padim import TASK as ANOMALY_DETECTION_TASK
    from .pipeline_padim import AnomalyDetectionPipeline
    from .predict import predict_images
    from .sweep import run_sweep

__all__ = ["register", *_EXPORTS]
