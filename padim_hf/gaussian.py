"""Per-position Gaussian statistics of patch embeddings: accumulate, merge, finalise, score.

Shapes: P grid positions, C embedding channels, B images.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

# Positions factorised per step when finalising: bounds the float64 working set (64 x 550^2 x 8 B = 155 MB).
FINALISE_CHUNK = 64


@dataclass
class PatchStatistics:
    """Sufficient statistics of the embeddings seen so far, shifted by `shift` for numerical stability.

    Shifting by a value close to the mean (the first batch's mean) keeps the float32 outer-product sums free of
    the cancellation that plain sums of x x^T suffer, so one fp32 GEMM per batch is enough; the exact covariance
    follows from the shifted sums. Memory is fixed by P and C, never by the number of images.

    Attributes:
        count: number of images accumulated.
        shift: (P, C) float32, the reference point of the sums.
        shifted_sum: (P, C) float64, sum of (x - shift).
        shifted_outer: (P, C, C) float32, sum of (x - shift)(x - shift)^T.
    """

    count: int
    shift: Tensor
    shifted_sum: Tensor
    shifted_outer: Tensor

    @classmethod
    def empty(cls, shift: Tensor) -> "PatchStatistics":
        """Statistics of no images around `shift` (P, C)."""
        positions, channels = shift.shape
        return cls(
            count=0,
            shift=shift.float(),
            shifted_sum=shift.new_zeros(positions, channels, dtype=torch.float64),
            shifted_outer=shift.new_zeros(positions, channels, channels, dtype=torch.float32),
        )

    @classmethod
    def from_first_batch(cls, patches: Tensor) -> "PatchStatistics":
        """Empty statistics shifted by the mean of `patches` (P, B, C), ready for `update(patches)`."""
        return cls.empty(patches.float().mean(dim=1))

    def update(self, patches: Tensor) -> None:
        """Adds a batch of patch embeddings (P, B, C) in place: one batched fp32 GEMM."""
        centred = patches.float() - self.shift.unsqueeze(1)
        self.shifted_sum += centred.sum(dim=1, dtype=torch.float64)
        self.shifted_outer.baddbmm_(centred.transpose(1, 2), centred)
        self.count += patches.shape[1]

    def rebase_(self, shift: Tensor) -> "PatchStatistics":
        """Re-expresses the sums around another `shift` (P, C), in place and exactly; returns self.

        sum (x - k')(x - k')^T = sum (x - k)(x - k)^T + a s^T + s a^T + n a a^T, with a = k - k' and
        s = sum (x - k). Done per chunk of positions so no second (P, C, C) tensor is ever allocated.
        """
        offset = self.shift.double() - shift.double()
        for start in range(0, offset.shape[0], FINALISE_CHUNK):
            chunk = slice(start, start + FINALISE_CHUNK)
            a, s = offset[chunk], self.shifted_sum[chunk]
            correction = a.unsqueeze(2) * s.unsqueeze(1) + s.unsqueeze(2) * a.unsqueeze(1)
            correction += self.count * a.unsqueeze(2) * a.unsqueeze(1)
            self.shifted_outer[chunk] += correction.float()
        self.shifted_sum += self.count * offset
        self.shift = shift.float().clone()
        return self

    def merge_(self, other: "PatchStatistics") -> "PatchStatistics":
        """Adds the images of `other` (rebased in place onto this shift) to these statistics; returns self."""
        other.rebase_(self.shift)
        self.count += other.count
        self.shifted_sum += other.shifted_sum
        self.shifted_outer += other.shifted_outer
        return self

    def mean(self) -> Tensor:
        """(P, C) float64 mean."""
        self._require_images()
        return self.shift.double() + self.shifted_sum / self.count

    def covariance(self, positions: slice = slice(None)) -> Tensor:
        """(P, C, C) float64 unbiased sample covariance (zero for a single image) at `positions`."""
        self._require_images()
        shifted_mean = self.shifted_sum[positions] / self.count
        scatter = self.shifted_outer[positions].double() - self.count * (
            shifted_mean.unsqueeze(2) * shifted_mean.unsqueeze(1)
        )
        return scatter / max(self.count - 1, 1)

    def _require_images(self) -> None:
        if self.count == 0:
            raise ValueError("no training images were accumulated: the training set is empty")


def whitening_factors(statistics: PatchStatistics, epsilon: float) -> Tensor:
    """(P, C, C) float32 lower-triangular W with W^T W = (covariance + epsilon I)^-1 at every position.

    W is the inverse Cholesky factor, so the Mahalanobis distance is ||W (x - mean)||: one GEMM per position at
    test time, no solve. All positions of a chunk are factorised at once in float64.
    """
    positions, channels = statistics.shift.shape
    identity = torch.eye(channels, dtype=torch.float64, device=statistics.shift.device)
    factors = torch.empty(positions, channels, channels, dtype=torch.float32, device=statistics.shift.device)
    for start in range(0, positions, FINALISE_CHUNK):
        chunk = slice(start, start + FINALISE_CHUNK)
        cholesky, info = torch.linalg.cholesky_ex(statistics.covariance(chunk) + epsilon * identity)
        if info.any():
            raise ValueError(f"covariance is not positive definite at grid positions {chunk}; increase epsilon")
        factors[chunk] = torch.linalg.solve_triangular(cholesky, identity.expand_as(cholesky), upper=False).float()
    return factors


def mahalanobis_distances(patches: Tensor, mean: Tensor, whitening: Tensor) -> Tensor:
    """(P, B) distances of patches (P, B, C) to per-position Gaussians given by mean (P, C) and W (P, C, C)."""
    whitened = torch.bmm(patches - mean.unsqueeze(1), whitening.transpose(1, 2))
    return whitened.square().sum(dim=-1).sqrt()


def pack_lower(matrices: Tensor) -> Tensor:
    """(..., C, C) lower-triangular -> (..., C (C + 1) / 2) packed rows."""
    rows, cols = torch.tril_indices(matrices.shape[-1], matrices.shape[-1], device=matrices.device)
    return matrices[..., rows, cols]


def unpack_lower(packed: Tensor, channels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `pack_lower`: (..., C (C + 1) / 2) -> (..., C, C), zeros above the diagonal."""
    rows, cols = torch.tril_indices(channels, channels, device=packed.device)
    matrices = packed.new_zeros(*packed.shape[:-1], channels, channels, dtype=dtype)
    matrices[..., rows, cols] = packed.to(dtype)
    return matrices
