"""padim_hf: PaDiM anomaly detection, native to the Hugging Face Hub."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_padim import PadimConfig
from .gaussian import PatchStatistics
from .image_processing_padim import PadimImageProcessor
from .modeling_padim import PadimModel, PadimOutput

AutoConfig.register(PadimConfig.model_type, PadimConfig)
AutoModel.register(PadimConfig, PadimModel)
AutoImageProcessor.register(PadimConfig, image_processor_classes={"torchvision": PadimImageProcessor})
# save_pretrained writes the code files and `auto_map`, so `trust_remote_code=True` works without this package.
PadimConfig.register_for_auto_class()
PadimModel.register_for_auto_class("AutoModel")
PadimImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["PadimConfig", "PadimImageProcessor", "PadimModel", "PadimOutput", "PatchStatistics"]
