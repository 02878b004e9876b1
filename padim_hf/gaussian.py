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


# Positions whose float16 factor is upcast per step when scoring: 8 WR50-Rd550 positions are 6 MB in float32, a
# cache-sized working set. Measured on the 2-core EPYC (WR50-Rd550): batch 32 scores as fast as from a resident
# float32 factor (~0.65 s); batch 1 takes ~300 instead of ~170 ms, as the upcast is not fused into the GEMM (the
# chunk size, 8 to 64, changes neither). Half the memory is worth it; latency-bound CPUs use the exports.
SCORE_CHUNK = 8

# Lower-triangular (P, C, C) stacks are stored as this many block rows; see `LowerBlockRows`.
LOWER_BLOCKS = 4


@dataclass
class LowerBlockRows:
    """A stack of (P, C, C) matrices of which only the lower triangle matters, stored as block rows.

    Block i holds rows r_i:r_(i+1) and columns 0:r_(i+1) (bounds r = C * i / LOWER_BLOCKS), i.e. everything left
    of the block diagonal: 10/16 of the full matrices with 4 blocks. Each block is a contiguous (P, rows, columns)
    tensor, so products with it are plain batched GEMMs (in-place ones included: torch's CPU `baddbmm_` into a
    strided view of a full matrix falls back to a per-matrix loop). Inside the diagonal blocks the entries above
    the diagonal are kept as they come (symmetric sums) or zero (triangular factors).
    """

    blocks: list[Tensor]

    @staticmethod
    def bounds(channels: int) -> list[int]:
        count = min(LOWER_BLOCKS, channels)
        return [channels * index // count for index in range(count + 1)]

    @property
    def channels(self) -> int:
        return self.blocks[-1].shape[-1]

    @property
    def row_ranges(self) -> list[tuple[int, int]]:
        bounds = self.bounds(self.channels)
        return list(zip(bounds, bounds[1:]))

    @classmethod
    def zeros(cls, positions: int, channels: int, **tensor_options) -> "LowerBlockRows":
        bounds = cls.bounds(channels)
        return cls([torch.zeros(positions, b - a, b, **tensor_options) for a, b in zip(bounds, bounds[1:])])

    @classmethod
    def outer(cls, centred: Tensor) -> "LowerBlockRows":
        """The lower block rows of centred^T centred for centred (P, B, C): one batched GEMM per block."""
        bounds = cls.bounds(centred.shape[-1])
        return cls([torch.bmm(centred[:, :, a:b].transpose(1, 2), centred[:, :, :b]) for a, b in zip(bounds, bounds[1:])])

    @classmethod
    def from_dense(cls, matrices: Tensor) -> "LowerBlockRows":
        """The lower block rows of (P, C, C) `matrices`, copied."""
        bounds = cls.bounds(matrices.shape[-1])
        return cls([matrices[:, a:b, :b].clone() for a, b in zip(bounds, bounds[1:])])

    def add_outer_(self, centred: Tensor) -> None:
        """Adds the lower block rows of centred^T centred (P, B, C) in place."""
        for block, (start, stop) in zip(self.blocks, self.row_ranges):
            block.baddbmm_(centred[:, :, start:stop].transpose(1, 2), centred[:, :, :stop])

    def dense(self, positions: slice = slice(None), dtype: torch.dtype = torch.float32) -> Tensor:
        """(p, C, C) new tensor at `positions`: the stored entries, zeros right of the block diagonal."""
        first = self.blocks[0][positions]
        matrices = first.new_empty(first.shape[0], self.channels, self.channels, dtype=dtype)
        for block, (start, stop) in zip(self.blocks, self.row_ranges):
            matrices[:, start:stop, :stop] = block[positions]
            matrices[:, start:stop, stop:] = 0
        return matrices

    def set_dense_(self, positions: slice, matrices: Tensor) -> None:
        """Stores the lower block rows of (p, C, C) `matrices` at `positions`."""
        for block, (start, stop) in zip(self.blocks, self.row_ranges):
            block[positions] = matrices[:, start:stop, :stop]

    def add_dense_(self, positions: slice, matrices: Tensor) -> None:
        """Adds the lower block rows of (p, C, C) `matrices` at `positions`."""
        for block, (start, stop) in zip(self.blocks, self.row_ranges):
            block[positions] += matrices[:, start:stop, :stop].to(block.dtype)

    def add_(self, other: "LowerBlockRows") -> None:
        for block, other_block in zip(self.blocks, other.blocks):
            block += other_block

    def map(self, function) -> "LowerBlockRows":
        """The same matrices with `function` applied to every block (a device move, a reduction across processes)."""
        return LowerBlockRows([function(block) for block in self.blocks])


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
        shifted_outer: (P, C, C) float32, sum of (x - shift)(x - shift)^T, lower block rows only (symmetric).
    """

    count: int
    shift: Tensor
    shifted_sum: Tensor
    shifted_outer: LowerBlockRows

    @classmethod
    def empty(cls, shift: Tensor) -> "PatchStatistics":
        """Statistics of no images around `shift` (P, C)."""
        positions, channels = shift.shape
        return cls(
            count=0,
            shift=shift.float(),
            shifted_sum=shift.new_zeros(positions, channels, dtype=torch.float64),
            shifted_outer=LowerBlockRows.zeros(positions, channels, dtype=torch.float32, device=shift.device),
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
            shifted_outer=LowerBlockRows.outer(centred),  # written once: no zero-filled buffer first
        )

    def update(self, patches: Tensor) -> None:
        """Adds a batch of patch embeddings (P, B, C) in place: one batched fp32 GEMM."""
        # Contiguous (P, B, C): a batched GEMM over a permuted view is ~10x slower on CPU.
        centred = (patches.float() - self.shift.unsqueeze(1)).contiguous()
        # A float32 sum over one batch is exact to ~1e-7 relative; the float64 total keeps it so across batches.
        self.shifted_sum += centred.sum(dim=1).double()
        self.shifted_outer.add_outer_(centred)
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
            self.shifted_outer.add_dense_(chunk, correction)
        self.shifted_sum += self.count * offset
        self.shift = shift.float().clone()
        return self

    def merge_(self, other: "PatchStatistics") -> "PatchStatistics":
        """Adds the images of `other` (rebased in place onto this shift) to these statistics; returns self."""
        other.rebase_(self.shift)
        self.count += other.count
        self.shifted_sum += other.shifted_sum
        self.shifted_outer.add_(other.shifted_outer)
        return self

    def mean(self) -> Tensor:
        """(P, C) float64 mean."""
        self._require_images()
        return self.shift.double() + self.shifted_sum / self.count

    def covariance(self, positions: slice = slice(None), dtype: torch.dtype = torch.float64) -> Tensor:
        """(P, C, C) unbiased sample covariance (zero for a single image) at `positions`, a new tensor in `dtype`."""
        lower = self.lower_covariance(positions, dtype).tril_()
        return lower + lower.tril(-1).transpose(1, 2)

    def lower_covariance(self, positions: slice = slice(None), dtype: torch.dtype = torch.float64) -> Tensor:
        """Like `covariance`, but only the lower triangle is meaningful (all a Cholesky factorisation reads).

        float32 loses nothing that matters here: the sums are float32 already and the shift keeps the mean
        correction small. It is ~10x faster than float64 on CPU, where forming the covariance is memory-bound.
        """
        self._require_images()
        shifted_mean = (self.shifted_sum[positions] / self.count).to(dtype)
        scatter = self.shifted_outer.dense(positions, dtype).baddbmm_(
            shifted_mean.unsqueeze(2), shifted_mean.unsqueeze(1), alpha=-self.count
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
    statistics: PatchStatistics, epsilon: float, out: LowerBlockRows | None = None, dtype: torch.dtype = torch.float32
) -> LowerBlockRows:
    """Lower-triangular W (P, C, C), float32, with W^T W = (covariance + epsilon I)^-1 at every position.

    W is the inverse Cholesky factor, so the Mahalanobis distance is ||W (x - mean)||: one GEMM per position at
    test time, no solve. Positions are processed in chunks: the covariance is formed from the sums and factorised
    by `inverse_cholesky` in `dtype`. float32 is about twice as fast on CPU and its distances differ from
    float64's by ~1e-4 relative at most (below float16 storage rounding, see BENCHMARKS.md); positions where float32
    loses positive definiteness are redone in float64.

    `out` receives W; it may be `statistics.shifted_outer` itself, which finalises in place with no second set of
    matrices (the statistics are unusable afterwards).
    """
    positions, channels = statistics.shift.shape
    if out is None:
        out = LowerBlockRows.zeros(positions, channels, dtype=torch.float32, device=statistics.shift.device)
    for start in range(0, positions, FINALISE_CHUNK):
        chunk = slice(start, start + FINALISE_CHUNK)
        covariance = statistics.lower_covariance(chunk, dtype)  # read before `out` may overwrite the sums
        covariance.diagonal(dim1=-2, dim2=-1).add_(epsilon)
        factors, info = inverse_cholesky(covariance, out=covariance)
        failed = info != 0
        if failed.any():  # float32 lost definiteness: redo those positions in float64
            covariance64 = statistics.lower_covariance(chunk)[failed]
            covariance64.diagonal(dim1=-2, dim2=-1).add_(epsilon)
            factors64, info64 = inverse_cholesky(covariance64)
            factors[failed] = factors64.to(factors.dtype)
            if info64.any():
                raise ValueError(f"covariance is not positive definite at grid positions {chunk}; increase epsilon")
        out.set_dense_(chunk, factors)
    return out


def mahalanobis_distances(patches: Tensor, mean: Tensor, whitening: LowerBlockRows) -> Tensor:
    """(P, B) distances of patches (P, B, C) to per-position Gaussians given by mean (P, C) and lower-triangular W.

    W may be stored in a lower precision than the patches (float16): it is then upcast `SCORE_CHUNK` positions at
    a time, so scoring never holds a full-precision copy of it, and the distances equal those of an upcast W.
    """
    if whitening.blocks[0].dtype == patches.dtype:
        return _whitened_norms(patches, mean, whitening)
    parts = []
    for start in range(0, patches.shape[0], SCORE_CHUNK):
        chunk = slice(start, start + SCORE_CHUNK)
        upcast = whitening.map(lambda block: block[chunk].to(patches.dtype))
        parts.append(_whitened_norms(patches[chunk], mean[chunk], upcast))
    return torch.cat(parts)


def _whitened_norms(patches: Tensor, mean: Tensor, whitening: LowerBlockRows) -> Tensor:
    """||W (x - mean)|| at every position: one batched GEMM per block row of W."""
    # Contiguous (P, B, C): a batched GEMM over a permuted view is ~10x slower on CPU.
    centred = (patches - mean.unsqueeze(1)).contiguous()
    squared = None
    for block, (_, stop) in zip(whitening.blocks, whitening.row_ranges):
        whitened = torch.bmm(centred[:, :, :stop], block.transpose(1, 2))  # rows of W are zero beyond `stop`
        part = whitened.square().sum(dim=-1)
        squared = part if squared is None else squared.add_(part)
    return squared.sqrt()


def _packed_rows(matrices: LowerBlockRows):
    """(row of W within its block, slice of the packed vector) for each of the C rows of the lower triangle."""
    offset = 0
    for block, (start, stop) in zip(matrices.blocks, matrices.row_ranges):
        for row in range(start, stop):
            yield block[:, row - start, : row + 1], slice(offset, offset + row + 1)
            offset += row + 1


# pack/unpack copy one triangle row of every matrix at a time: C strided copies run ~2x faster than one
# index_select gather over the C (C + 1) / 2 packed entries, and need no full-precision temporary.


def pack_lower(matrices: LowerBlockRows, dtype: torch.dtype | None = None) -> Tensor:
    """Lower triangles (P, C, C) -> (P, C (C + 1) / 2) packed rows, in `dtype` (default the matrices')."""
    first = matrices.blocks[0]
    channels = matrices.channels
    packed = first.new_empty(first.shape[0], channels * (channels + 1) // 2, dtype=dtype or first.dtype)
    for row, entries in _packed_rows(matrices):
        packed[:, entries] = row
    return packed


def unpack_lower(
    packed: Tensor, channels: int, dtype: torch.dtype = torch.float32, out: LowerBlockRows | None = None
) -> LowerBlockRows:
    """Inverse of `pack_lower`: (P, C (C + 1) / 2) -> lower-triangular (P, C, C) in `dtype`, zeros above the diagonal.

    `out` receives the result (only the lower triangle is written, so the rest must be zero already).
    """
    if out is None:
        out = LowerBlockRows.zeros(packed.shape[0], channels, dtype=dtype, device=packed.device)
    for row, entries in _packed_rows(out):
        row.copy_(packed[:, entries])
    return out
