"""Hub round trips against a Hub-protocol server on loopback, driven by the real huggingface_hub client."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub import ModelCard, constants, hf_hub_download
from transformers import pipeline

import padim_hf
from padim_hf import HubPushError, PadimImageProcessor, PadimModel, push_model
from padim_hf.postprocess import normalized_score

from .conftest import small_lite0_config
from .hub_server import serve
from .test_model import REMOTE_CODE_FILES

TOKEN = "hf_loopback_write_token"
REPO_ROOT = Path(__file__).resolve().parents[1]


def directory_digest(directory: Path) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def images(hazelnut) -> dict[str, list[PIL.Image.Image]]:
    train = [PIL.Image.open(path).convert("RGB") for path in sorted((hazelnut / "train" / "good").glob("*.png"))[:4]]
    test = [PIL.Image.open(path).convert("RGB") for path in sorted((hazelnut / "test" / "crack").glob("*.png"))[:2]]
    return {"train": train, "test": test}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, hazelnut, lite0_weights, images) -> tuple[PadimModel, Path]:
    """A small Lite0 PaDiM fitted on 4 hazelnut images at 64 px, calibrated and 'evaluated', saved to disk."""
    config = small_lite0_config(train_dataset=str(hazelnut))
    model = PadimModel(config).load_backbone_weights(lite0_weights)
    processor = PadimImageProcessor.from_padim_config(config)
    model.fit([processor(images["train"], return_tensors="pt")["pixel_values"]])
    model.config.image_threshold = 3.0
    model.config.pixel_threshold = 2.5
    model.config.score_min, model.config.score_max = 1.0, 5.0
    model.config.metrics = {
        "image_auroc": 0.875,
        "pixel_auroc": 0.9625,
        "pixel_aupro": 0.8125,
        "image_f1_max": 0.9,
        "pixel_f1_max": 0.4,
        "dataset": {"name": "mvtec_ad_reduced/hazelnut", "config": "hazelnut", "split": "test"},
        "num_images": 2,
    }
    directory = tmp_path_factory.mktemp("model") / "padim-hazelnut"
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = serve(tmp_path_factory.mktemp("hub"), {TOKEN: "tester"})
    yield server
    server.close()


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """Points this process's huggingface_hub at the loopback hub, with a fresh cache and HF_TOKEN set.

    HF_ENDPOINT and friends are read when huggingface_hub is imported, so the constants are patched instead;
    the client code itself runs unchanged.
    """
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-login" / "stored_tokens"))
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers caches an HfApi bound to the endpoint
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def anomaly_maps(model: PadimModel, images: list[PIL.Image.Image]) -> torch.Tensor:
    pixel_values = PadimImageProcessor.from_padim_config(model.config)(images, return_tensors="pt")["pixel_values"]
    return model(pixel_values).anomaly_map


def test_package_is_the_worktree():
    assert Path(padim_hf.__file__).resolve().parent == REPO_ROOT / "padim_hf"


def test_push_then_load_by_repo_id_gives_identical_maps(fitted, images, hub_env):
    model, directory = fitted
    before = directory_digest(directory)

    commit_url = push_model(directory, "acme/padim-hazelnut")

    repo = hub_env.state.repos["acme/padim-hazelnut"]
    assert commit_url == f"{hub_env.url}/acme/padim-hazelnut/commit/{repo.branches['main']}"
    assert len(repo.history) == 2  # the repo's initial commit, then everything in one commit
    files = set(repo.commits[repo.branches["main"]])
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "configuration_padim.py",
        "modeling_padim.py",
        "image_processing_padim.py",
        "gaussian.py",
        "pipeline_padim.py",
    } <= files
    assert repo.commits[repo.branches["main"]]["model.safetensors"].lfs
    assert directory_digest(directory) == before  # the generated card went up without touching the directory

    loaded = PadimModel.from_pretrained("acme/padim-hazelnut")
    assert loaded.config.feature_indices == model.config.feature_indices
    assert loaded.config.image_threshold == 3.0
    assert torch.equal(anomaly_maps(loaded, images["test"]), anomaly_maps(model, images["test"]))


def test_pushed_card_parses_and_carries_metrics(fitted, hub_env):
    _, directory = fitted
    push_model(directory, "acme/padim-card")

    card = ModelCard.load("acme/padim-card")

    assert card.data.library_name == "transformers"
    assert card.data.base_model == "timm/tf_efficientnet_lite0"
    assert card.data.license == "cc-by-nc-sa-4.0"  # fitted on MVTec AD: its licence carries over
    assert {"anomaly-detection", "padim"} <= set(card.data.tags)
    results = {result.metric_name: result for result in card.data.eval_results}
    assert results["Image AUROC"].metric_value == 0.875
    assert results["Pixel AUROC"].metric_value == 0.9625
    assert results["Pixel AUPRO"].metric_value == 0.8125
    assert results["Pixel AUROC"].dataset_config == "hazelnut"
    assert results["Pixel AUROC"].dataset_split == "test"
    assert "Fitted on **4** defect-free images" in card.text
    assert "| Pixel AUPRO | 0.8125 |" in card.text
    assert "On mvtec_ad_reduced/hazelnut / hazelnut, split `test` (2 images):" in card.text
    assert "arXiv 2011.08785" in card.text


def test_existing_readme_and_gallery_are_pushed_as_they_are(fitted, hub_env, tmp_path):
    _, directory = fitted
    copy = tmp_path / "with-gallery"
    shutil.copytree(directory, copy)
    PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(copy / "gallery.png")
    push_model(copy, "acme/padim-gallery")
    generated = ModelCard.load("acme/padim-gallery")
    assert "![Test images, ground truth and predicted anomaly maps](gallery.png)" in generated.text

    (copy / "README.md").write_text("---\nlicense: mit\n---\n# hand written\n")
    push_model(copy, "acme/padim-gallery", commit_message="hand-written card")
    card = ModelCard.load("acme/padim-gallery")
    assert card.data.license == "mit" and card.text.strip() == "# hand written"
    assert "gallery.png" in hub_env.state.repos["acme/padim-gallery"].commits[
        hub_env.state.repos["acme/padim-gallery"].branches["main"]
    ]


def test_push_to_branch_then_load_revision(fitted, hub_env, tmp_path):
    model, directory = fitted
    push_model(directory, "acme/padim-branches")
    model.config.image_threshold = 7.5
    try:
        candidate = tmp_path / "candidate"
        model.save_pretrained(candidate)
    finally:
        model.config.image_threshold = 3.0
    push_model(candidate, "acme/padim-branches", revision="candidate")

    assert PadimModel.from_pretrained("acme/padim-branches", revision="candidate").config.image_threshold == 7.5
    assert PadimModel.from_pretrained("acme/padim-branches").config.image_threshold == 3.0


def test_sharded_push_replaces_single_file_weights(fitted, images, hub_env, tmp_path):
    model, directory = fitted
    push_model(directory, "acme/padim-sharded")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    shards = sorted(path.name for path in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (sharded / "model.safetensors.index.json").is_file()

    push_model(sharded, "acme/padim-sharded")

    repo = hub_env.state.repos["acme/padim-sharded"]
    files = set(repo.commits[repo.branches["main"]])
    assert "model.safetensors" not in files  # else transformers would load the stale single file
    assert set(shards) | {"model.safetensors.index.json"} <= files
    loaded = PadimModel.from_pretrained("acme/padim-sharded")
    assert torch.equal(anomaly_maps(loaded, images["test"]), anomaly_maps(model, images["test"]))


def test_model_push_to_hub_carries_processor_and_pipeline(fitted, hub_env):
    """`model.push_to_hub` is transformers' own upload (the model file knows nothing of padim_hf's Hub layer): it
    still carries the image processor, the pipeline and the code, since save_pretrained writes them."""
    model, _ = fitted
    model.push_to_hub("acme/padim-method", commit_message="from push_to_hub")

    repo = hub_env.state.repos["acme/padim-method"]
    files = set(repo.commits[repo.branches["main"]])
    assert {"README.md", "preprocessor_config.json", "pipeline_padim.py", "model.safetensors"} <= files
    config = json.loads(Path(hf_hub_download("acme/padim-method", "config.json")).read_text())
    assert config["custom_pipelines"]["anomaly-detection"]["impl"] == "pipeline_padim.AnomalyDetectionPipeline"
    assert config["auto_map"]["AutoModel"] == "modeling_padim.PadimModel"
    assert PadimModel.from_pretrained("acme/padim-method").config.num_train_images == 4


def test_push_of_a_model_object_writes_our_card(fitted, hub_env):
    model, _ = fitted
    url = padim_hf.push(model, "acme/padim-object", commit_message="from padim_hf.push")

    repo = hub_env.state.repos["acme/padim-object"]
    assert url.endswith(f"/acme/padim-object/commit/{repo.branches['main']}")
    assert {"README.md", "preprocessor_config.json", "pipeline_padim.py", "model.safetensors"} <= set(
        repo.commits[repo.branches["main"]]
    )
    assert ModelCard.load("acme/padim-object").data.eval_results  # the card with the metrics, not a generic one


def test_save_pretrained_with_push_to_hub_uploads_everything(fitted, hub_env, tmp_path):
    model, _ = fitted
    model.save_pretrained(tmp_path / "padim-saved", push_to_hub=True, revision="v1")

    assert not (tmp_path / "padim-saved" / "README.md").exists()  # the card is generated for the upload only
    # repo_id defaults to the directory name, like transformers; the Hub puts it in the token owner's namespace
    repo = hub_env.state.repos["tester/padim-saved"]
    assert set(repo.commits[repo.branches["v1"]]) >= {"README.md", "preprocessor_config.json", "model.safetensors"}


def test_private_repo_needs_a_token(fitted, hub_env, monkeypatch):
    _, directory = fitted
    push_model(directory, "acme/padim-private", private=True)
    assert hub_env.state.repos["acme/padim-private"].private

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(OSError, match="acme/padim-private(.|\n)*private repository(.|\n)*token"):
        PadimModel.from_pretrained("acme/padim-private")
    with pytest.raises(HubPushError, match="HF_TOKEN"):
        push_model(directory, "acme/padim-private")
    with pytest.raises(HubPushError, match="refused the token"):
        push_model(directory, "acme/padim-other", token="hf_not_a_valid_token")
    assert "acme/padim-other" not in hub_env.state.repos

    assert PadimModel.from_pretrained("acme/padim-private", token=TOKEN).config.num_train_images == 4


def test_server_error_mid_push_then_retry(fitted, hub_env):
    _, directory = fitted
    before = directory_digest(directory)
    hub_env.state.fail_next("commit")  # the weights reach LFS storage, then the commit itself fails

    with pytest.raises(HubPushError, match="Nothing was committed.*run the same push again"):
        push_model(directory, "acme/padim-retry")

    repo = hub_env.state.repos["acme/padim-retry"]
    assert len(repo.history) == 1 and set(repo.commits[repo.history[0]]) == {".gitattributes"}
    assert directory_digest(directory) == before
    uploads = len([request for request in hub_env.state.requests if request[1].startswith("/__lfs/")])

    push_model(directory, "acme/padim-retry")

    assert len(repo.history) == 2 and "model.safetensors" in repo.commits[repo.branches["main"]]
    # the weights uploaded by the failed attempt are not sent again
    assert len([request for request in hub_env.state.requests if request[1].startswith("/__lfs/")]) == uploads
    assert PadimModel.from_pretrained("acme/padim-retry").config.num_train_images == 4


def test_offline_mode_loads_from_cache_and_fails_clearly_when_uncached(fitted, hub_env, monkeypatch):
    _, directory = fitted
    push_model(directory, "acme/padim-offline")
    push_model(directory, "acme/padim-never-downloaded")
    PadimModel.from_pretrained("acme/padim-offline")  # fills the cache

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests = len(hub_env.state.requests)
    assert PadimModel.from_pretrained("acme/padim-offline").config.num_train_images == 4
    assert len(hub_env.state.requests) == requests  # served from the cache only
    with pytest.raises(OSError, match="acme/padim-never-downloaded.*HF_HUB_OFFLINE"):
        PadimModel.from_pretrained("acme/padim-never-downloaded")
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_model(directory, "acme/padim-offline")


def test_push_rejects_a_directory_that_is_not_a_saved_model(tmp_path, hub_env):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        push_model(tmp_path / "missing", "acme/x")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "padim"}))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json.*model.safetensors"):
        push_model(tmp_path, "acme/x")
    assert "acme/x" not in hub_env.state.repos


def expected_outputs(model: PadimModel, image: PIL.Image.Image) -> tuple[float, np.ndarray]:
    processor = PadimImageProcessor.from_padim_config(model.config)
    output = model(processor(image, return_tensors="pt")["pixel_values"])
    anomaly_map = processor.post_process_anomaly_maps(output.anomaly_map, [(image.height, image.width)])[0]
    return float(output.pred_score[0]), anomaly_map.numpy()


def check_pipeline_result(result: dict, model: PadimModel, image: PIL.Image.Image, rtol: float = 1e-6) -> None:
    score, anomaly_map = expected_outputs(model, image)
    assert result["score"] == pytest.approx(score, rel=rtol)
    assert result["normalized_score"] == pytest.approx(float(normalized_score(score, model.config)), rel=rtol)
    assert result["label"] is (score >= model.config.image_threshold)
    assert result["anomaly_map"].shape == (image.height, image.width)
    np.testing.assert_allclose(result["anomaly_map"], anomaly_map, rtol=rtol)
    np.testing.assert_array_equal(result["mask"], result["anomaly_map"] >= model.config.pixel_threshold)
    assert result["mask"].mean() == pytest.approx((anomaly_map >= model.config.pixel_threshold).mean(), abs=1e-3)


def test_pipeline_on_pil_images_and_paths(fitted, images, tmp_path):
    model, directory = fitted
    detector = pipeline("anomaly-detection", model=str(directory))
    test_images = [images["test"][0], images["test"][1].resize((96, 64)), images["train"][0]]

    results = detector(test_images)

    assert len(results) == 3
    for result, image in zip(results, test_images):
        check_pipeline_result(result, model, image)
    assert results[0]["score"] > results[2]["score"]  # a cracked hazelnut scores above a training image
    paths = []
    for index, image in enumerate(test_images[:2]):
        paths.append(tmp_path / f"image{index}.png")
        image.save(paths[-1])
    from_paths = detector([str(path) for path in paths])
    for result, image in zip(from_paths, test_images[:2]):
        check_pipeline_result(result, model, image)
    single = detector(str(paths[0]))
    assert single["score"] == pytest.approx(results[0]["score"], rel=1e-6)
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        detector(str(tmp_path / "missing.png"))
    batched = detector(test_images, batch_size=2)  # images of different sizes share batches
    for result, image in zip(batched, test_images):
        check_pipeline_result(result, model, image, rtol=1e-4)  # batched convolutions round differently


def test_config_rewritten_in_place_still_names_the_pipeline(fitted, tmp_path):
    model, directory = fitted
    loaded = PadimModel.from_pretrained(directory)
    assert not hasattr(loaded.config, "custom_pipelines")  # else transformers would demand trust_remote_code
    loaded.config.to_json_file(tmp_path / "config.json", use_diff=True)  # what evaluate does to update metrics
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["custom_pipelines"]["anomaly-detection"]["impl"] == "pipeline_padim.AnomalyDetectionPipeline"


def test_pipeline_without_calibration_gives_no_label_or_mask(fitted, images, tmp_path):
    model, _ = fitted
    model.config.image_threshold = model.config.pixel_threshold = None
    try:
        model.save_pretrained(tmp_path / "uncalibrated")
    finally:
        model.config.image_threshold, model.config.pixel_threshold = 3.0, 2.5
    result = pipeline("anomaly-detection", model=str(tmp_path / "uncalibrated"))(images["test"][0])
    assert result["label"] is None and result["mask"] is None and result["normalized_score"] is None
    assert result["score"] == pytest.approx(expected_outputs(model, images["test"][0])[0], rel=1e-6)


def test_pipeline_by_repo_id(fitted, images, hub_env):
    model, directory = fitted
    push_model(directory, "acme/padim-pipeline")
    result = pipeline("anomaly-detection", model="acme/padim-pipeline")(images["test"][0])
    check_pipeline_result(result, model, images["test"][0])


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["padim_hf"] = None  # a user without the package: only the repo's code may be used
    import numpy as np, torch, PIL.Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    repo, image_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = AutoModel.from_pretrained(repo, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    image = PIL.Image.open(image_path)
    anomaly_map = model(processor(image, return_tensors="pt")["pixel_values"]).anomaly_map
    detector = pipeline("anomaly-detection", model=repo, trust_remote_code=True)
    assert type(detector).__module__.startswith("transformers_modules."), type(detector).__module__
    result = detector(image_path)
    np.savez(out, anomaly_map=anomaly_map.numpy(), score=result["score"], pipeline_map=result["anomaly_map"])
    """
)


@pytest.mark.slow
def test_trust_remote_code_without_the_package(fitted, images, hub_env, tmp_path):
    model, directory = fitted
    push_model(directory, "acme/padim-remote")
    repo = hub_env.state.repos["acme/padim-remote"]
    assert sorted(name for name in repo.commits[repo.branches["main"]] if name.endswith(".py")) == REMOTE_CODE_FILES
    image_path = tmp_path / "crack.png"
    images["test"][0].save(image_path)
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_env.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "PYTHONPATH": "",  # the worktree must not be importable: the code comes from the repo
    }
    out = tmp_path / "remote.npz"
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, "acme/padim-remote", str(image_path), str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = np.load(out)
    expected_map = anomaly_maps(model, [images["test"][0]]).numpy()
    np.testing.assert_array_equal(remote["anomaly_map"], expected_map)
    score, full_size_map = expected_outputs(model, images["test"][0])
    assert float(remote["score"]) == pytest.approx(score, rel=1e-6)
    np.testing.assert_allclose(remote["pipeline_map"], full_size_map, rtol=1e-6)


@pytest.mark.slow
def test_cli_push_configured_by_environment(fitted, hub_env, tmp_path):
    """`padim-hf push` in a fresh process that finds the Hub through HF_ENDPOINT and the token through HF_TOKEN."""
    _, directory = fitted
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_env.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "PYTHONPATH": str(REPO_ROOT),
    }
    command = [sys.executable, "-m", "padim_hf.cli", "push", str(directory), "acme/padim-cli", "--revision", "rc1"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    repo = hub_env.state.repos["acme/padim-cli"]
    assert completed.stdout.strip().endswith(f"/acme/padim-cli/commit/{repo.branches['rc1']}")
    assert set(repo.commits[repo.branches["main"]]) == {".gitattributes"}  # the branch got the model, main did not
    assert PadimModel.from_pretrained("acme/padim-cli", revision="rc1").config.num_train_images == 4

    # A server failure reaches the user as one clear line and a non-zero exit status.
    changed = tmp_path / "changed"
    shutil.copytree(directory, changed)
    (changed / "README.md").write_text("# a new card\n")  # a change, so the client has a commit to send
    (changed / "notes.txt").write_text("calibrated on line 3\n")  # not a model file: never pushed
    hub_env.state.fail_next("commit")
    command[4] = str(changed)
    failed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    assert "padim-hf push: error: push of" in failed.stderr and "run the same push again" in failed.stderr
    assert "notes.txt" not in repo.commits[repo.branches["rc1"]]


def test_push_with_exports_in_the_same_commit_then_predict_from_the_repo(fitted, images, hub_env, tmp_path):
    from padim_hf.predict import load_engine

    model, directory = fitted
    before = directory_digest(directory)
    push_model(directory, "acme/padim-exported", export=["onnx", "openvino"])

    repo = hub_env.state.repos["acme/padim-exported"]
    assert len(repo.history) == 2  # the repo's initial commit, then model and exports in one commit
    files = set(repo.commits[repo.branches["main"]])
    assert {"model.safetensors", "onnx/model.onnx", "onnx/padim_export.json", "onnx/padim_runtime.py",
            "openvino/model.xml", "openvino/model.bin", "openvino/padim_export.json"} <= files
    assert directory_digest(directory) == before  # exported to a temporary folder, not into the model directory
    card = ModelCard.load("acme/padim-exported")
    assert "## Run without PyTorch" in card.text and "from padim_runtime import PadimRuntime" in card.text

    pixel_values = PadimImageProcessor.from_padim_config(model.config)(images["test"], return_tensors="pt")["pixel_values"]
    reference = model(pixel_values)
    for engine in ("onnxruntime", "openvino"):
        score, _, config = load_engine("acme/padim-exported", engine)  # downloads onnx/ or openvino/ only
        maps, scores = score(pixel_values)
        assert config.image_threshold == 3.0
        torch.testing.assert_close(maps, reference.anomaly_map, rtol=1e-4, atol=1e-4 * float(reference.anomaly_map.max()))
        torch.testing.assert_close(scores, reference.pred_score, rtol=1e-4, atol=0)
