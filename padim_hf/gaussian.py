"""Per-position Gaussian statistics of patch embeddings: accumulate, merge, finalise, score.

Shapes: P grid positions, C embedding channels, B images.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

# Positions factorised per step when finalising: bounds the working set (64 x 550^2 x 8 B = 155 MB in float64).
FINALISE_CHUNK = 64
# Blocks at most this large are factorised by LAPACK; larger ones are split in two and recombined with batched GEMMs.
_LAPACK_BLOCK = 64


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
        """Statistics of a first batch of patch embeddings (P, B, C), shifted by its mean."""
        shift = patches.float().mean(dim=1)
        centred = (patches.float() - shift.unsqueeze(1)).contiguous()
        return cls(
            count=patches.shape[1],
            shift=shift,
            shifted_sum=centred.sum(dim=1).double(),
            shifted_outer=torch.bmm(centred.transpose(1, 2), centred),  # written once: no zero-filled 3.8 GB first
        )

    def update(self, patches: Tensor) -> None:
        """Adds a batch of patch embeddings (P, B, C) in place: one batched fp32 GEMM."""
        # Contiguous (P, B, C): a batched GEMM over a permuted view is ~10x slower on CPU.
        centred = (patches.float() - self.shift.unsqueeze(1)).contiguous()
        # A float32 sum over one batch is exact to ~1e-7 relative; the float64 total keeps it so across batches.
        self.shifted_sum += centred.sum(dim=1).double()
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

    def covariance(self, positions: slice = slice(None), dtype: torch.dtype = torch.float64) -> Tensor:
        """(P, C, C) unbiased sample covariance (zero for a single image) at `positions`, a new tensor in `dtype`.

        float32 loses nothing that matters here: the sums are float32 already and the shift keeps the mean
        correction small. It is ~10x faster than float64 on CPU, where forming the covariance is memory-bound.
        """
        self._require_images()
        shifted_mean = (self.shifted_sum[positions] / self.count).to(dtype)
        scatter = torch.baddbmm(
            self.shifted_outer[positions].to(dtype), shifted_mean.unsqueeze(2), shifted_mean.unsqueeze(1), alpha=-self.count
        )
        return scatter.div_(max(self.count - 1, 1))

    def _require_images(self) -> None:
        if self.count == 0:
            raise ValueError("no training images were accumulated: the training set is empty")


def inverse_cholesky(matrices: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Lower-triangular W = L^-1 of symmetric positive definite (B, n, n) matrices (L L^T = A), and LAPACK info.

    Recursive 2 x 2 blocking: with A = [[A11, A21^T], [A21, A22]], W11 = L11^-1, T = A21 W11^T, the Schur complement
    S = A22 - T T^T, W22 = chol(S)^-1 and W21 = -W22 T W11. Almost all the work is batched GEMMs, which run at a
    multiple of the speed of batched LAPACK Cholesky + triangular solves; blocks of at most 64 go to LAPACK.
    `out` (B, n, n), possibly a strided view, receives W; it may be `matrices` itself (every block of A is read before
    its place in `out` is written). `info` (B,) is nonzero where A was not positive definite.
    """
    n = matrices.shape[-1]
    if out is None:
        out = torch.empty_like(matrices)
    if n <= _LAPACK_BLOCK:
        cholesky, info = torch.linalg.cholesky_ex(matrices)
        identity = torch.eye(n, dtype=matrices.dtype, device=matrices.device).expand_as(cholesky)
        out.copy_(torch.linalg.solve_triangular(cholesky, identity, upper=False))
        return out, info
    k = n // 2
    w11, info11 = inverse_cholesky(matrices[:, :k, :k], out[:, :k, :k])
    t = torch.bmm(matrices[:, k:, :k], w11.transpose(1, 2))
    schur = torch.baddbmm(matrices[:, k:, k:], t, t.transpose(1, 2), alpha=-1)
    w22, info22 = inverse_cholesky(schur, out[:, k:, k:])
    out[:, k:, :k] = torch.bmm(torch.bmm(w22, t), w11).neg_()
    out[:, :k, k:] = 0
    return out, torch.where(info11 != 0, info11, torch.where(info22 != 0, info22 + k, info22))


def whitening_factors(
    statistics: PatchStatistics, epsilon: float, out: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(P, C, C) float32 lower-triangular W with W^T W = (covariance + epsilon I)^-1 at every position.

    W is the inverse Cholesky factor, so the Mahalanobis distance is ||W (x - mean)||: one GEMM per position at
    test time, no solve. Positions are processed in chunks: the covariance is formed in float64 from the sums and
    factorised by `inverse_cholesky` in `dtype`. float32 is about twice as fast on CPU and its distances differ from
    float64's by ~1e-4 relative at most (below float16 storage rounding, see BENCHMARKS.md); positions where float32
    loses positive definiteness are redone in float64.

    `out` (P, C, C) float32 receives W; it may be `statistics.shifted_outer` itself, which finalises in place with
    no second (P, C, C) tensor (the statistics are unusable afterwards). W is float32 whatever `dtype`.
    """
    positions, channels = statistics.shift.shape
    device = statistics.shift.device
    if out is None:
        out = torch.empty(positions, channels, channels, dtype=torch.float32, device=device)
    for start in range(0, positions, FINALISE_CHUNK):
        chunk = slice(start, start + FINALISE_CHUNK)
        covariance = statistics.covariance(chunk, dtype)  # read before `out[chunk]` may overwrite the sums
        covariance.diagonal(dim1=-2, dim2=-1).add_(epsilon)
        factors, info = inverse_cholesky(covariance, out=covariance)
        failed = info != 0
        if failed.any():  # float32 lost definiteness: redo those positions in float64
            covariance64 = statistics.covariance(chunk)[failed]
            covariance64.diagonal(dim1=-2, dim2=-1).add_(epsilon)
            factors[failed], info64 = _inverse_cholesky_float64(covariance64)
            if info64.any():
                raise ValueError(f"covariance is not positive definite at grid positions {chunk}; increase epsilon")
        out[chunk] = factors
    return out


def _inverse_cholesky_float64(matrices: Tensor) -> tuple[Tensor, Tensor]:
    cholesky, info = torch.linalg.cholesky_ex(matrices)
    identity = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device).expand_as(cholesky)
    return torch.linalg.solve_triangular(cholesky, identity, upper=False).float(), info


# W is lower triangular: scoring splits its rows in this many blocks and skips the all-zero column ranges, which
# saves 6/16 of the GEMM work and of the memory traffic (W is read once per batch).
_DISTANCE_BLOCKS = 4


def mahalanobis_distances(patches: Tensor, mean: Tensor, whitening: Tensor) -> Tensor:
    """(P, B) distances of patches (P, B, C) to per-position Gaussians given by mean (P, C) and lower-triangular W (P, C, C)."""
    # Contiguous (P, B, C): a batched GEMM over a permuted view is ~10x slower on CPU.
    centred = (patches - mean.unsqueeze(1)).contiguous()
    channels = centred.shape[-1]
    # Small batches are bound by reading W, where the strided blocks are slower than one contiguous pass.
    blocks = _DISTANCE_BLOCKS if channels >= 64 and centred.shape[1] >= 8 else 1
    bounds = [channels * index // blocks for index in range(blocks + 1)]
    squared = None
    for start, stop in zip(bounds, bounds[1:]):
        # rows start:stop of W are zero beyond column stop
        whitened = torch.bmm(centred[:, :, :stop], whitening[:, start:stop, :stop].transpose(1, 2))
        block = whitened.square().sum(dim=-1)
        squared = block if squared is None else squared.add_(block)
    return squared.sqrt()


def _packed_rows(channels: int):
    """(row, slice of the packed vector) for each row of a C x C lower-triangular matrix."""
    offset = 0
    for row in range(channels):
        yield row, slice(offset, offset + row + 1)
        offset += row + 1


# pack/unpack copy one triangle row of every matrix at a time: C strided copies run ~2x faster than one
# index_select gather over the C (C + 1) / 2 packed entries, and need no full-precision temporary.


def pack_lower(matrices: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(..., C, C) lower-triangular -> (..., C (C + 1) / 2) packed rows, in `dtype` (default the input's)."""
    channels = matrices.shape[-1]
    flat = matrices.reshape(-1, channels, channels)
    packed = torch.empty(flat.shape[0], channels * (channels + 1) // 2, dtype=dtype or matrices.dtype, device=matrices.device)
    for row, entries in _packed_rows(channels):
        packed[:, entries] = flat[:, row, : row + 1]
    return packed.reshape(*matrices.shape[:-2], packed.shape[-1])


def unpack_lower(packed: Tensor, channels: int, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """Inverse of `pack_lower`: (..., C (C + 1) / 2) -> (..., C, C) in `dtype`, zeros above the diagonal.

    `out` (..., C, C) receives the result (only its lower triangle is written, so its upper one must be zero).
    """
    if out is None:
        out = torch.zeros(*packed.shape[:-1], channels, channels, dtype=dtype, device=packed.device)
    flat_out = out.view(-1, channels, channels)
    flat = packed.reshape(-1, packed.shape[-1])
    for row, entries in _packed_rows(channels):
        flat_out[:, row, : row + 1] = flat[:, entries]
    return out
