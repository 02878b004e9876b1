import numpy as np
import pytest
import torch

from padim_hf.gaussian import (
    PatchStatistics,
    mahalanobis_distances,
    pack_lower,
    unpack_lower,
    whitening_factors,
)


def accumulate(patches: torch.Tensor, batch_size: int) -> PatchStatistics:
    statistics = None
    for start in range(0, patches.shape[1], batch_size):
        batch = patches[:, start : start + batch_size]
        statistics = statistics or PatchStatistics.from_first_batch(batch)
        statistics.update(batch)
    return statistics


def reference_mean_covariance(patches: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass float64 per-position reference, the way the paper writes it."""
    positions, _, channels = patches.shape
    means = patches.mean(axis=1)
    covariances = np.stack([np.cov(patches[p], rowvar=False) + epsilon * np.eye(channels) for p in range(positions)])
    return means, covariances


@pytest.fixture
def patches() -> torch.Tensor:
    # An offset far from zero stresses cancellation, the failure mode of naive sum-of-squares accumulation.
    generator = torch.Generator().manual_seed(0)
    return 50.0 + torch.randn(6, 23, 5, generator=generator) * torch.linspace(0.1, 3.0, 5)


def test_streamed_mean_and_covariance_match_two_pass_float64_reference(patches):
    statistics = accumulate(patches, batch_size=4)
    mean, covariance = reference_mean_covariance(patches.double().numpy(), epsilon=0.01)
    assert statistics.count == 23
    np.testing.assert_allclose(statistics.mean().numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(statistics.covariance().numpy() + 0.01 * np.eye(5), covariance, rtol=1e-4)


def test_statistics_do_not_depend_on_batch_size(patches):
    one = accumulate(patches, batch_size=1)
    all_at_once = accumulate(patches, batch_size=23)
    torch.testing.assert_close(one.covariance(), all_at_once.covariance(), rtol=1e-5, atol=1e-6)


def test_merging_statistics_with_different_shifts_equals_accumulating_all(patches):
    first, second = accumulate(patches[:, :10], 3), accumulate(patches[:, 10:] + 0.0, 4)
    assert not torch.equal(first.shift, second.shift)
    merged = first.merge_(second)
    everything = accumulate(patches, 23)
    assert merged.count == 23
    torch.testing.assert_close(merged.mean(), everything.mean())
    torch.testing.assert_close(merged.covariance(), everything.covariance(), rtol=1e-5, atol=1e-6)


def test_single_image_gives_epsilon_identity_covariance(patches):
    statistics = accumulate(patches[:, :1], 1)
    torch.testing.assert_close(statistics.covariance(), torch.zeros(6, 5, 5, dtype=torch.float64))
    factors = whitening_factors(statistics, epsilon=0.01)
    torch.testing.assert_close(factors, torch.eye(5).expand(6, 5, 5) * 10.0)


def test_empty_statistics_raise_a_clear_error():
    statistics = PatchStatistics.empty(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="training set is empty"):
        statistics.mean()


def test_distances_equal_per_position_mahalanobis_reference(patches):
    statistics = accumulate(patches, 5)
    factors = whitening_factors(statistics, epsilon=0.01)
    mean, covariance = reference_mean_covariance(patches.double().numpy(), epsilon=0.01)
    queries = patches[:, :3] + torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(1))
    distances = mahalanobis_distances(queries, statistics.mean().float(), factors)
    for p in range(6):
        precision = np.linalg.inv(covariance[p])
        for b in range(3):
            delta = queries[p, b].double().numpy() - mean[p]
            assert distances[p, b].item() == pytest.approx(np.sqrt(delta @ precision @ delta), rel=1e-4)


def test_packing_round_trips_lower_triangular_matrices():
    lower = torch.randn(3, 4, 4).tril()
    packed = pack_lower(lower)
    assert packed.shape == (3, 10)
    torch.testing.assert_close(unpack_lower(packed, 4), lower)
