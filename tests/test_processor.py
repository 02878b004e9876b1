import numpy as np
import PIL.Image
import pytest
import torch

from padim_hf import PadimImageProcessor
from padim_hf.image_processing_padim import to_rgb_uint8
from tests.conftest import small_lite0_config


@pytest.fixture
def processor() -> PadimImageProcessor:
    return PadimImageProcessor.from_padim_config(small_lite0_config(image_size=64, crop_size=48))


def test_every_input_kind_becomes_the_same_normalised_rgb_tensor(processor):
    gray = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    inputs = [
        PIL.Image.fromarray(gray),  # mode L
        PIL.Image.fromarray(gray).convert("RGBA"),  # opaque alpha changes nothing
        gray.astype(np.uint16) * 257,  # 16-bit
        PIL.Image.fromarray(gray.astype(np.uint16) * 257),  # PIL I;16
        torch.from_numpy(gray).float().div(255).expand(3, -1, -1),  # float CHW tensor
    ]
    pixel_values = processor(inputs, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (5, 3, 48, 48)
    for other in pixel_values[1:]:
        torch.testing.assert_close(other, pixel_values[0], atol=1.5 / 127.5, rtol=0)  # within one 8-bit step
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1  # Lite0 normalisation: mean = std = 0.5


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    assert (to_rgb_uint8(rgba) == 255).all()


def test_unsupported_image_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"got \(5, 5, 2\)"):
        to_rgb_uint8(np.zeros((5, 5, 2), np.uint8))


def test_maps_come_back_at_each_original_size_with_crop_undone(processor):
    maps = torch.zeros(2, 1, 48, 48)
    maps[:, :, 24:, :] = 1.0  # lower half of the crop is anomalous
    restored = processor.post_process_anomaly_maps(maps, [(300, 200), (50, 120)])
    assert [tuple(m.shape) for m in restored] == [(300, 200), (50, 120)]
    assert restored[0][:100].max() == 0 and restored[0][-60:].min() == 1  # crop border extended to the margins
