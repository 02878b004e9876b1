"""padim_hf: PaDiM anomaly detection, native to the Hugging Face Hub."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_padim import PadimConfig
from .gaussian import PatchStatistics
from .image_processing_padim import PadimImageProcessor
from .hub import HubPushError, push_model
from .modeling_padim import PadimModel, PadimOutput
from .pipeline_padim import TASK as ANOMALY_DETECTION_TASK
from .pipeline_padim import AnomalyDetectionPipeline

AutoConfig.register(PadimConfig.model_type, PadimConfig)
AutoModel.register(PadimConfig, PadimModel)
AutoImageProcessor.register(PadimConfig, image_processor_classes={"torchvision": PadimImageProcessor})
# save_pretrained writes the code files and `auto_map`, so `trust_remote_code=True` works without this package.
PadimConfig.register_for_auto_class()
PadimModel.register_for_auto_class("AutoModel")
PadimImageProcessor.register_for_auto_class("AutoImageProcessor")
PIPELINE_REGISTRY.register_pipeline(
    ANOMALY_DETECTION_TASK, pipeline_class=AnomalyDetectionPipeline, pt_model=AutoModel, type="image"
)

__all__ = [
    "AnomalyDetectionPipeline",
    "HubPushError",
    "PadimConfig",
    "PadimImageProcessor",
    "PadimModel",
    "PadimOutput",
    "PatchStatistics",
    "push_model",
]
