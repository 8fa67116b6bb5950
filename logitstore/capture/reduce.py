"""On-device reduction of one chunk of logit rows to what a store keeps, per capture mode.

Every mode returns `[r, K]` ids (-1 = padding), their exact log-probs at T=1 over the full
vocabulary (-inf at padding) in descending order, and `[r, n_T]` log-normalizers
`logsumexp(l / T)` of the log-probs `l = log_softmax(z)` (0 at T=1); sampled mode also
returns `[r, K]` draw counts. Nothing wider than `[r, K]` leaves the device.

- topk: the K largest logits.
- adaptive: the fewest of the K largest whose T=1 mass reaches `coverage` (the rest padding).
- sampled: M draws from the T=1 distribution by inverse CDF; the distinct ids with their
  counts, most likely first, at most K of them. The uniforms come from a counter-based hash
  of (seed, global token position, draw), not from a stateful generator, so a token's draws
  do not depend on its batch, its work unit, the process that captured it, or a resume.
  With a head of H ids, the first H slots are the top-H ids (count 0) and the M draws come
  from the rest of the distribution, the tail, whose every id ranks below them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Reduction:
    """What one capture mode keeps per token; see the module docstring."""

    mode: str
    k: int  # stored slots per token
    temperatures: tuple[float, ...]
    coverage: float | None = None
    draws: int | None = None
    seed: int | None = None
    head: int = 0  # sampled mode: top ids kept exactly before the draws

    def __call__(
        self, z: torch.Tensor, keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """fp32 logits [r, V] (and int64 global token positions [r], sampled mode) →
        (ids int32 [r, K], logp fp32 [r, K], lse fp32 [r, n_T], counts uint8 [r, K] or None)."""
        lse = torch.stack([torch.logsumexp(z / t if t != 1.0 else z, dim=-1) for t in self.temperatures], dim=-1)
        lse1 = lse[:, self.temperatures.index(1.0), None]
        counts = None
        if self.mode == "sampled":
            if keys is None:
                raise ValueError("sampled mode needs the tokens' global positions")
            top = torch.topk(z, self.head, dim=-1).indices if self.head else None
            ids, counts = sample_unique(z, lse1, keys, self.draws, self.seed, self.k - self.head, exclude=top)
            if top is not None:
                ids = torch.cat([top, ids], dim=1)
                counts = torch.cat([torch.zeros_like(top, dtype=torch.uint8), counts], dim=1)
            logp = torch.where(ids >= 0, z.gather(1, ids.clamp(min=0)) - lse1, -torch.inf)
            ids = torch.where(torch.isneginf(logp), -1, ids)  # a masked logit in the head (count 0): padding
        else:
            values, ids = torch.topk(z, self.k, dim=-1)
            logp = values - lse1
            if self.mode == "adaptive":
                # Keep slot j while the mass of slots < j is below the coverage: the smallest
                # prefix whose mass reaches it (all K when even K slots fall short).
                before = torch.cumsum(logp.exp(), dim=-1) - logp.exp()
                logp = torch.where(before < self.coverage, logp, -torch.inf)
            # A masked logit (-inf) carries no mass: it is padding, not an id.
            ids = torch.where(torch.isneginf(logp), -1, ids)
        # What is stored is the log-normalizer of the log-probs l = z - lse_1 rather than of z:
        # logsumexp(l / T) = lse_T - lse_1 / T, exactly 0 at T = 1. Every use, log p_T(i) =
        # (l_i + lse[T=1]) / T - lse[T], gives the same either way (a shift of z cancels), and the
        # all-zero T = 1 column costs pcodec next to nothing: 9.0 -> 6.3 B/token at 3 temperatures.
        temps = torch.tensor(self.temperatures, dtype=torch.float64, device=lse.device)
        lse = (lse.double() - lse1.double() / temps).float()
        return ids.to(torch.int32), logp, lse, counts


def sample_unique(
    z: torch.Tensor, lse1: torch.Tensor, keys: torch.Tensor, draws: int, seed: int, k: int,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`draws` ids per row from softmax(z), or from it conditioned on not being one of the
    `exclude` ids [r, H], by inverse CDF on hashed uniforms; → (distinct ids int64 [r, K] most
    likely first, -1 padded; counts uint8 [r, K]). When a row has more than K distinct ids,
    the least likely ones and their draws are dropped; a row with no mass left draws nothing."""
    probs = (z - lse1).exp_()  # [r, V], the only extra vocabulary-wide buffer
    if exclude is not None:
        probs.scatter_(1, exclude, 0.0)
    cdf = probs.cumsum_(dim=-1)
    u = hashed_uniforms(keys, draws, seed)
    # Scale by the row's total (the mass left after `exclude`), so that float32 rounding of the
    # cumsum cannot push a draw past the end. u < 1, but u * total can still round up to total
    # (a subnormal total, or a tie): such a draw belongs to the last id with mass, the first
    # place where the cdf reaches its total, not to the last column.
    total = cdf[:, -1:].contiguous()
    drawn = torch.minimum(torch.searchsorted(cdf, u * total, right=True), torch.searchsorted(cdf, total))
    drawn = torch.where(total > 0, drawn, -1)
    del cdf, probs
    # Never a draw on an id without mass: a masked logit or an excluded id has a zero-width
    # interval, which a parallel (GPU) cumsum may round to one ulp. Such a draw is dropped.
    no_mass = torch.isneginf(z.gather(1, drawn.clamp(min=0)))
    if exclude is not None:
        excluded = torch.sort(exclude, dim=-1).values
        nearest = torch.searchsorted(excluded, drawn).clamp_(max=excluded.shape[1] - 1)
        no_mass |= excluded.gather(1, nearest) == drawn
    drawn = torch.where(no_mass, -1, drawn)
    drawn, _ = torch.sort(drawn, dim=-1)
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = torch.cumsum(first, dim=-1) - 1  # [r, M]: which distinct id each draw is
    counts = torch.zeros_like(drawn).scatter_add_(1, group, (drawn >= 0).long())
    ids = torch.full_like(drawn, -1).scatter_(1, group, drawn)  # every draw of a group writes the same id
    ids = torch.where(counts > 0, ids, -1)
    # Most likely first (the format's rank order); padding (-inf) last; stable, so ties keep id order.
    score = torch.where(ids >= 0, z.gather(1, ids.clamp(min=0)), -torch.inf)
    order = torch.argsort(score, dim=-1, descending=True, stable=True)[:, :k]
    return ids.gather(1, order), counts.gather(1, order).to(torch.uint8)


def hashed_uniforms(keys: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """float32 [r, draws] in [0, 1): splitmix64 of (seed, key, draw) on the keys' device; the
    same (seed, key, draw) gives the same number everywhere."""
    counter = keys.to(torch.int64)[:, None] * draws + torch.arange(draws, device=keys.device)
    x = counter + _i64(seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15)  # int64 arithmetic wraps mod 2^64
    x = (x ^ _srl(x, 30)) * _i64(0xBF58476D1CE4E5B9)
    x = (x ^ _srl(x, 27)) * _i64(0x94D049BB133111EB)
    x = x ^ _srl(x, 31)
    return _srl(x, 40).to(torch.float32) * 2.0**-24  # the top 24 bits: exact in float32


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c
