"""Model cards built from a config alone (no fitting, no Hub)."""

from huggingface_hub import ModelCard

from padim_hf import PadimConfig
from padim_hf.modelcard import build_model_card


def lite0_config(**overrides) -> PadimConfig:
    return PadimConfig(backbone="tf_efficientnet_lite0", n_features=16, image_size=64, **overrides)


def test_unevaluated_model_has_no_model_index_and_says_so():
    config = lite0_config(num_train_images=12, train_dataset="acme/bottle-caps", crop_size=56)
    card = ModelCard(str(build_model_card(config, "acme/padim-caps")))

    assert card.data.eval_results is None
    assert card.data.license == "apache-2.0"  # not fitted on MVTec AD: the package's licence
    assert card.data.datasets == ["acme/bottle-caps"]  # a Hub dataset id goes into the metadata
    assert card.data.pipeline_tag == "image-segmentation"
    assert "has not been evaluated yet" in card.text
    assert "Fitted on **12** defect-free images from [acme/bottle-caps](https://huggingface.co/datasets/acme/bottle-caps)" in card.text
    assert "resize to 64 x 64, centre crop to 56 x 56, normalise with mean (0.5, 0.5, 0.5)" in card.text
    assert "| Kept channels (Rd) | 16 of 176, random subset drawn with seed 0 |" in card.text
    assert 'pipeline("anomaly-detection", model="acme/padim-caps", trust_remote_code=True)' in card.text
    assert "![" not in card.text  # no gallery image to show


def test_local_dataset_paths_stay_out_of_metadata(tmp_path):
    config = lite0_config(
        train_dataset=str(tmp_path),
        metrics={"pixel_auroc": 0.97, "dataset": {"name": str(tmp_path), "config": None, "split": "test"}},
        pixel_threshold=1.25,
    )
    card = ModelCard(str(build_model_card(config)))

    assert card.data.datasets is None
    (result,) = card.data.eval_results
    assert (result.metric_name, result.metric_value, result.dataset_name) == ("Pixel AUROC", 0.97, tmp_path.name)
    assert "pixel threshold 1.25" in card.text
    assert card.data.model_name == "padim-tf_efficientnet_lite0"
    assert f"from the local folder `{tmp_path.name}`" in card.text and str(tmp_path) not in card.text
