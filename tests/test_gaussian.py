import numpy as np
import pytest
import torch

from padim_hf.gaussian import (
    LowerBlockRows,
    PatchStatistics,
    inverse_cholesky,
    mahalanobis_distances,
    pack_lower,
    unpack_lower,
    whitening_factors,
)


def accumulate(patches: torch.Tensor, batch_size: int) -> PatchStatistics:
    statistics = None
    for start in range(0, patches.shape[1], batch_size):
        batch = patches[:, start : start + batch_size]
        if statistics is None:
            statistics = PatchStatistics.from_first_batch(batch)
        else:
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


def test_float32_covariance_matches_float64(patches):
    statistics = accumulate(patches, batch_size=4)
    covariance32 = statistics.covariance(dtype=torch.float32)
    assert covariance32.dtype == torch.float32
    torch.testing.assert_close(covariance32.double(), statistics.covariance(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [1, 7, 64, 65, 150, 300])
def test_inverse_cholesky_matches_float64_reference_at_every_recursion_depth(size):
    generator = torch.Generator().manual_seed(size)
    samples = torch.randn(3, size + 5, size, generator=generator, dtype=torch.float64)
    matrices = samples.mT @ samples / (size + 4) + 0.01 * torch.eye(size, dtype=torch.float64)
    expected = torch.linalg.inv(torch.linalg.cholesky(matrices))
    factors, info = inverse_cholesky(matrices.clone())
    torch.testing.assert_close(factors, expected, rtol=1e-9, atol=1e-9)
    assert info.tolist() == [0, 0, 0]
    in_place = matrices.float().clone()
    inverse_cholesky(in_place, out=in_place)  # the finalisation factorises the covariance chunk in place
    relative = (in_place.double() - expected).norm() / expected.norm()
    assert relative < 1e-4
    assert in_place.triu(1).abs().max() == 0


def test_finalising_never_changes_torch_thread_settings(monkeypatch):
    # With torch 2.14's MKL build, any torch.set_num_threads call makes a later batched torch.linalg.inv hang:
    # a library must not touch the process-wide setting.
    def refuse(threads):
        raise AssertionError(f"torch.set_num_threads({threads}) called")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    statistics = accumulate(torch.randn(2, 20, 150, generator=torch.Generator().manual_seed(0)), batch_size=8)
    factors = whitening_factors(statistics, epsilon=0.01)
    assert torch.isfinite(factors.dense()).all()


def test_positions_float32_cannot_factorise_are_redone_in_float64():
    along_diagonal = torch.tensor([-3.0, -1.0, 1.0, 3.0]) * 100
    statistics = PatchStatistics.from_first_batch(torch.stack([along_diagonal, along_diagonal], dim=1).unsqueeze(0))
    covariance = statistics.covariance() + 1e-6 * torch.eye(2, dtype=torch.float64)  # 1e4 + 1e-6 == 1e4 in float32
    _, info32 = inverse_cholesky(statistics.lower_covariance(dtype=torch.float32) + 1e-6 * torch.eye(2))
    assert info32.tolist() == [2]
    factors = whitening_factors(statistics, epsilon=1e-6, dtype=torch.float32).dense()
    expected = torch.linalg.inv(torch.linalg.cholesky(covariance)).float()
    torch.testing.assert_close(factors, expected, rtol=1e-5, atol=0)


def test_inverse_cholesky_reports_the_first_non_positive_pivot():
    matrices = torch.eye(150, dtype=torch.float64).repeat(2, 1, 1)
    matrices[1, 100, 100] = -1.0
    _, info = inverse_cholesky(matrices)
    assert info.tolist() == [0, 101]  # LAPACK convention: 1-based order of the failing leading minor


def test_single_image_gives_epsilon_identity_covariance(patches):
    statistics = accumulate(patches[:, :1], 1)
    torch.testing.assert_close(statistics.covariance(), torch.zeros(6, 5, 5, dtype=torch.float64))
    factors = whitening_factors(statistics, epsilon=0.01)
    torch.testing.assert_close(factors.dense(), torch.eye(5).expand(6, 5, 5) * 10.0)


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


def test_float16_factor_scores_exactly_like_its_float32_upcast_in_chunks_of_positions():
    """A float16 factor is upcast a few positions at a time (SCORE_CHUNK); 21 positions leave a partial last chunk."""
    generator = torch.Generator().manual_seed(0)
    positions, channels = 21, 9
    factor16 = LowerBlockRows.from_dense(torch.randn(positions, channels, channels, generator=generator).tril().half())
    factor32 = factor16.map(lambda block: block.float())
    patches, mean = torch.randn(positions, 3, channels, generator=generator), torch.randn(positions, channels, generator=generator)
    distances = mahalanobis_distances(patches, mean, factor16)
    assert distances.shape == (positions, 3) and distances.dtype == torch.float32
    assert torch.equal(distances, mahalanobis_distances(patches, mean, factor32))
    plain = torch.linalg.vector_norm(torch.einsum("pij,pbj->pbi", factor32.dense().double(), (patches - mean[:, None]).double()), dim=-1)
    torch.testing.assert_close(distances.double(), plain, rtol=1e-5, atol=0)


def test_packing_round_trips_lower_triangular_matrices():
    lower = torch.randn(3, 9, 9).tril()
    packed = pack_lower(LowerBlockRows.from_dense(lower))
    assert packed.shape == (3, 45)
    torch.testing.assert_close(packed[:, :3], torch.stack([lower[:, 0, 0], lower[:, 1, 0], lower[:, 1, 1]], dim=1))
    torch.testing.assert_close(unpack_lower(packed, 9).dense(), lower)


def test_lower_block_rows_keep_everything_left_of_the_block_diagonal():
    matrices = torch.randn(2, 9, 9)
    blocks = LowerBlockRows.from_dense(matrices)
    assert [tuple(block.shape) for block in blocks.blocks] == [(2, 2, 2), (2, 2, 4), (2, 2, 6), (2, 3, 9)]
    dense = blocks.dense()
    torch.testing.assert_close(dense.tril(), matrices.tril())
    assert sum(block.numel() for block in blocks.blocks) < 0.7 * matrices.numel()
    centred = torch.randn(2, 5, 9)
    torch.testing.assert_close(LowerBlockRows.outer(centred).dense().tril(), (centred.mT @ centred).tril())
