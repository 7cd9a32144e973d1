"""CLAP and GBM checked against brute-force re-implementations written from the ALGM specification.

The brute force works on plain Python lists (float64), one image and one window / pair at a time, and
tracks a dense source matrix ``S`` (T, N) per image: row t marks the original patches token t stands for
(prefix rows are zero). Every merge step is a list of groups (the old rows of each new token, in output
order), from which the step's one-hot (T_new, T_old) matrix is built.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from algm.global_merge import global_merge
from algm.local_merge import clap_destinations, conditional_pooling, window_similarity
from tokred.state import MergeState

ATOL = 1e-5
MARGIN = 1e-5
C = 32


@dataclass
class BfState:
    """Brute-force merge state of a batch: tokens, sizes and dense source matrices per image."""

    tokens: list[list[list[float]]]
    sizes: list[list[float]]
    source: list[torch.Tensor]
    n_prefix: int
    grid: tuple[int, int]

    @classmethod
    def start(cls, x: torch.Tensor, n_prefix: int, grid: tuple[int, int]) -> "BfState":
        B, T, _ = x.shape
        n = grid[0] * grid[1]
        s0 = torch.cat([torch.zeros(n_prefix, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)])
        return cls(x.double().tolist(), [[1.0] * T for _ in range(B)], [s0.clone() for _ in range(B)], n_prefix, grid)

    def with_tokens(self, x: torch.Tensor) -> "BfState":
        """Same sizes and sources, new token features (what the blocks between merge steps would do)."""
        assert x.shape[1] == len(self.sizes[0])
        return BfState(x.double().tolist(), self.sizes, self.source, self.n_prefix, self.grid)

    @property
    def num_tokens(self) -> int:
        return len(self.sizes[0])

    def x(self) -> torch.Tensor:
        return torch.tensor(self.tokens, dtype=torch.float64)

    def size_tensor(self) -> torch.Tensor:
        return torch.tensor(self.sizes, dtype=torch.float32).unsqueeze(-1)

    def index(self) -> torch.Tensor:
        """Row of every original patch: argmax over the patch rows of ``S`` (each column one-hot)."""
        rows = []
        for s in self.source:
            patch_rows = s[self.n_prefix:]
            assert torch.equal(patch_rows.sum(0), torch.ones(patch_rows.shape[1], dtype=torch.float64))
            rows.append(patch_rows.argmax(0) + self.n_prefix)
        return torch.stack(rows)


@dataclass
class BfStep:
    """What one brute-force step did: the new state, per-image (T_new, T_old) matrices, r and a tie margin."""

    state: BfState
    mats: list[torch.Tensor]
    r: int
    margin: float


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v))


def apply_groups(state: BfState, groups: list[list[list[int]]]) -> tuple[BfState, list[torch.Tensor]]:
    """Size-weighted mean of each group; ``groups[b][t]`` lists the old rows of new token t of image b."""
    tokens, sizes, sources, mats = [], [], [], []
    for b, img_groups in enumerate(groups):
        old_tok, old_size = state.tokens[b], state.sizes[b]
        m = torch.zeros(len(img_groups), len(old_size), dtype=torch.float64)
        new_tok, new_size = [], []
        for t, members in enumerate(img_groups):
            total = sum(old_size[i] for i in members)
            dim = len(old_tok[0])
            new_tok.append([sum(old_size[i] * old_tok[i][c] for i in members) / total for c in range(dim)])
            new_size.append(total)
            for i in members:
                m[t, i] = 1.0
        assert torch.equal(m.sum(0), torch.ones(m.shape[1], dtype=torch.float64))
        tokens.append(new_tok)
        sizes.append(new_size)
        sources.append(m @ state.source[b])
        mats.append(m)
    return BfState(tokens, sizes, sources, state.n_prefix, state.grid), mats


def bf_windows(grid: tuple[int, int], window: tuple[int, int]) -> list[list[int]]:
    """Patch indices of every window, windows row-major, tokens row-major inside a window."""
    gh, gw = grid
    wh, ww = window
    wins = []
    for wr in range(gh // wh):
        for wc in range(gw // ww):
            wins.append([(wr * wh + i) * gw + wc * ww + j for i in range(wh) for j in range(ww)])
    return wins


def bf_window_scores(state: BfState, window: tuple[int, int]) -> list[list[float]]:
    """Mean cosine similarity over the ordered pairs of distinct tokens of each window, per image."""
    out = []
    for tok in state.tokens:
        patches = [unit(t) for t in tok[state.n_prefix:]]
        img = []
        for win in bf_windows(state.grid, window):
            k = len(win)
            total = sum(dot(patches[i], patches[j]) for i in win for j in win if i != j)
            img.append(total / (k * (k - 1)))
        out.append(img)
    return out


def gaps(values: list[float]) -> float:
    """Smallest distance between two of ``values`` (inf for fewer than two)."""
    s = sorted(values)
    return min((b - a for a, b in zip(s, s[1:])), default=math.inf)


def bf_clap(state: BfState, window: tuple[int, int], tau: float) -> BfStep:
    scores = bf_window_scores(state, window)
    wins = bf_windows(state.grid, window)
    n = state.grid[0] * state.grid[1]
    p = state.n_prefix
    r = min(sum(1 for s in img if s >= tau) for img in scores)
    groups, margin = [], math.inf
    for img in scores:
        margin = min(margin, min(abs(s - tau) for s in img))
        order = sorted(range(len(wins)), key=lambda w: -img[w])
        margin = min(margin, gaps([img[w] for w in order[: r + 1]]))
        top = order[:r]
        merged = {q for w in top for q in wins[w]}
        g = [[i] for i in range(p)]
        g += [[p + q for q in wins[w]] for w in top]
        g += [[p + q] for q in range(n) if q not in merged]
        groups.append(g)
    new, mats = apply_groups(state, groups)
    return BfStep(new, mats, r, margin)


def bf_gbm(state: BfState, layer_idx: int) -> BfStep:
    T, p = state.num_tokens, state.n_prefix
    if (T - p) // 2 <= 0:
        ident = [torch.eye(T, dtype=torch.float64) for _ in state.tokens]
        return BfStep(state, ident, 0, math.inf)
    a_pos, b_pos = list(range(0, T, 2)), list(range(1, T, 2))
    node_max, node_idx, arg_margin = [], [], []
    for tok in state.tokens:
        units = [unit(t) for t in tok]
        nm, ni, am = [-math.inf], [None], [math.inf]
        for ia in range(1, len(a_pos)):
            cols = [jb for jb in range(len(b_pos)) if not (p == 2 and jb == 0)]
            cand = [(dot(units[a_pos[ia]], units[b_pos[jb]]), jb) for jb in cols]
            cand.sort(reverse=True)
            nm.append(cand[0][0])
            ni.append(cand[0][1])
            am.append(cand[0][0] - cand[1][0] if len(cand) > 1 else math.inf)
        node_max.append(nm)
        node_idx.append(ni)
        arg_margin.append(am)
    thr = statistics.fmean(statistics.fmean(nm[1:]) for nm in node_max) + statistics.fmean(
        statistics.stdev(nm[1:]) for nm in node_max
    ) / layer_idx
    r = min(sum(1 for v in nm if v >= thr) for nm in node_max)
    groups, margin = [], math.inf
    for nm, ni, am in zip(node_max, node_idx, arg_margin):
        margin = min(margin, min(abs(v - thr) for v in nm[1:]))
        order = sorted(range(1, len(a_pos)), key=lambda i: -nm[i])
        if 0 < r < len(order):
            margin = min(margin, nm[order[r - 1]] - nm[order[r]])
        chosen = set(order[:r])
        margin = min([margin] + [am[i] for i in chosen])
        kept_a = [[a_pos[ia]] for ia in range(len(a_pos)) if ia not in chosen]
        b_groups = [[b_pos[jb]] + [a_pos[ia] for ia in sorted(chosen) if ni[ia] == jb] for jb in range(len(b_pos))]
        if p == 2:
            groups.append([kept_a[0], b_groups[0]] + kept_a[1:] + b_groups[1:])
        else:
            groups.append(kept_a + b_groups)
    new, mats = apply_groups(state, groups)
    return BfStep(new, mats, r, margin)


def randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_same(out: torch.Tensor, state: MergeState, bf: BfState) -> None:
    """Tokens (order included), sizes, index map and dense source of the implementation equal the brute force."""
    ref = bf.x()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.allclose(out.double(), ref, atol=ATOL), (out.double() - ref).abs().max()
    assert torch.equal(state.size, bf.size_tensor())
    assert torch.equal(state.index, bf.index())
    source = torch.stack([s[bf.n_prefix:] for s in bf.source]).float()
    assert torch.equal(state.source_matrix(), source)


def assert_well_conditioned(step: BfStep) -> None:
    assert step.margin > MARGIN, f"fixture has a near tie ({step.margin:.2e}); pick another seed"


def mid_threshold(state: BfState, window: tuple[int, int]) -> float:
    """A threshold halfway between the two middle window scores of image 0 (no score equals it)."""
    s = sorted(bf_window_scores(state, window)[0])
    m = len(s) // 2
    return (s[m - 1] + s[m]) / 2


CLAP_CASES = [((8, 8), (2, 2)), ((6, 10), (2, 2)), ((7, 9), (2, 2)), ((7, 9), (3, 2))]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_prefix", [1, 2])
@pytest.mark.parametrize("grid,window", CLAP_CASES)
@pytest.mark.parametrize("mode", ["none", "some", "all"])
def test_clap_matches_bruteforce(batch, n_prefix, grid, window, mode):
    seed = 100 * batch + 10 * n_prefix + CLAP_CASES.index((grid, window))
    x = randn((batch, n_prefix + grid[0] * grid[1], C), seed)
    bf0 = BfState.start(x, n_prefix, grid)
    n_windows = len(bf_windows(grid, window))
    tau = {"none": 1.5, "all": -1.0, "some": None}[mode]
    if tau is None:
        tau = mid_threshold(bf0, window)
    step = bf_clap(bf0, window, tau)
    assert_well_conditioned(step)
    expected_r = {"none": 0, "all": n_windows}.get(mode)
    if expected_r is None:
        assert 0 < step.r < n_windows
    else:
        assert step.r == expected_r

    scores = torch.tensor(bf_window_scores(bf0, window), dtype=torch.float64)
    assert torch.allclose(window_similarity(x[:, n_prefix:], grid, window).double(), scores, atol=ATOL)
    _, n_out, r = clap_destinations(x, n_prefix, grid, window, tau)
    assert (r, n_out) == (step.r, step.state.num_tokens)
    assert n_out == n_prefix + step.r + grid[0] * grid[1] - step.r * window[0] * window[1]

    state = MergeState.start(x, n_prefix, grid)
    out = conditional_pooling(x, state, window, tau)
    assert_same(out, state, step.state)
    if mode == "none":
        assert torch.equal(out, x)


def after_clap(x0: torch.Tensor, n_prefix: int, grid: tuple[int, int]) -> tuple[MergeState, BfState]:
    """Implementation and brute-force states after a CLAP step (2x2 windows) that merges some windows."""
    bf0 = BfState.start(x0, n_prefix, grid)
    tau = mid_threshold(bf0, (2, 2))
    step = bf_clap(bf0, (2, 2), tau)
    assert_well_conditioned(step)
    assert step.r > 0
    state = MergeState.start(x0, n_prefix, grid)
    assert_same(conditional_pooling(x0, state, (2, 2), tau), state, step.state)
    return state, step.state


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_prefix", [1, 2])
@pytest.mark.parametrize("layer_idx", [5, 2])
@pytest.mark.parametrize("grid", [(8, 8), (7, 9)])
@pytest.mark.parametrize("start", ["fresh", "after_clap"])
def test_gbm_matches_bruteforce(batch, n_prefix, layer_idx, grid, start):
    seed = 1000 + 100 * batch + 10 * n_prefix + layer_idx + 3 * grid[0]
    x0 = randn((batch, n_prefix + grid[0] * grid[1], C), seed)
    if start == "fresh":
        state, bf = MergeState.start(x0, n_prefix, grid), BfState.start(x0, n_prefix, grid)
    else:
        state, bf = after_clap(x0, n_prefix, grid)
        assert bool((state.size > 1).any())
    x = randn((batch, state.num_tokens, C), seed + 1)
    step = bf_gbm(bf.with_tokens(x), layer_idx)
    assert_well_conditioned(step)
    assert step.r > 0
    out = global_merge(x, state, layer_idx)
    assert out.shape[1] == bf.num_tokens - step.r
    assert_same(out, state, step.state)


@pytest.mark.parametrize("n_prefix", [1, 2])
def test_gbm_r_zero_still_reorders(n_prefix):
    """Image 0 is nearly uniform, image 1 random: the batch threshold exceeds every score of image 1."""
    grid = (8, 8)
    T = n_prefix + 64
    base = randn((1, 1, C), 7)
    similar = base + 0.3 * randn((1, T, C), 8)
    x = torch.cat([similar, randn((1, T, C), 9)])
    step = bf_gbm(BfState.start(x, n_prefix, grid), 5)
    assert_well_conditioned(step)
    assert step.r == 0
    state = MergeState.start(x, n_prefix, grid)
    out = global_merge(x, state, 5)
    a, b = list(range(0, T, 2)), list(range(1, T, 2))
    order = [0, 1] + a[1:] + b[1:] if n_prefix == 2 else a + b
    assert torch.equal(out, x[:, order])
    assert torch.equal(state.size, torch.ones(2, T, 1))
    assert_same(out, state, step.state)


@pytest.mark.parametrize("n_prefix", [1, 2])
def test_gbm_too_few_tokens_is_identity(n_prefix):
    x = randn((2, n_prefix + 1, C), 11)
    state = MergeState.start(x, n_prefix, (1, 1))
    index0, size0 = state.index.clone(), state.size.clone()
    step = bf_gbm(BfState.start(x, n_prefix, (1, 1)), 5)
    out = global_merge(x, state, 5)
    assert torch.equal(out, x)
    assert torch.equal(state.index, index0)
    assert torch.equal(state.size, size0)
    assert_same(out, state, step.state)


@pytest.mark.parametrize("n_prefix", [1, 2])
@pytest.mark.parametrize("grid", [(8, 8), (7, 9)])
def test_chain_index_is_product_of_step_matrices(n_prefix, grid):
    batch = 3
    seed = 2000 + 10 * n_prefix + grid[1]
    x0 = randn((batch, n_prefix + grid[0] * grid[1], C), seed)
    bf0 = BfState.start(x0, n_prefix, grid)
    state = MergeState.start(x0, n_prefix, grid, trace_source=True)
    tau = mid_threshold(bf0, (2, 2))

    steps = [bf_clap(bf0, (2, 2), tau)]
    out = conditional_pooling(x0, state, (2, 2), tau)
    assert_same(out, state, steps[-1].state)
    for i, layer_idx in enumerate((5, 9)):
        x = randn((batch, state.num_tokens, C), seed + 1 + i)
        steps.append(bf_gbm(steps[-1].state.with_tokens(x), layer_idx))
        out = global_merge(x, state, layer_idx)
        assert_same(out, state, steps[-1].state)
    for step in steps:
        assert_well_conditioned(step)
        assert step.r > 0

    assert len(state.history) == 3
    for b in range(batch):
        product = torch.eye(x0.shape[1], dtype=torch.float64)
        for k, step in enumerate(steps):
            product = step.mats[b] @ product
            s = product @ bf0.source[b]
            assert torch.equal(s, step.state.source[b])
            assert torch.equal(state.history[k][b], s[n_prefix:].argmax(0) + n_prefix)
        assert torch.equal(state.index[b], s[n_prefix:].argmax(0) + n_prefix)

    y = randn((batch, state.num_tokens - n_prefix, 5), seed + 9)
    final = steps[-1].state
    rows = final.index() - n_prefix
    gathered = torch.stack([torch.stack([y[b, rows[b, q]] for q in range(rows.shape[1])]) for b in range(batch)])
    assert torch.equal(state.unmerge(y), gathered)
    dense = torch.stack([final.source[b][n_prefix:].T.float() @ y[b] for b in range(batch)])
    assert torch.allclose(state.unmerge(y), dense, atol=ATOL)


def smooth_features(batch: int, n_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Low-resolution random fields upsampled to the grid plus small noise, with random prefix tokens."""
    coarse = torch.randn(batch, C, 3, 3)
    field = F.interpolate(coarse, size=grid, mode="bilinear", align_corners=True)
    patches = field.flatten(2).transpose(1, 2) + 0.05 * torch.randn(batch, grid[0] * grid[1], C)
    return torch.cat([torch.randn(batch, n_prefix, C), patches], dim=1)


def test_token_count_regression_smooth_features():
    torch.manual_seed(0)
    grid, n_prefix = (12, 12), 1
    x = smooth_features(2, n_prefix, grid)
    state = MergeState.start(x, n_prefix, grid)
    clap = bf_clap(BfState.start(x, n_prefix, grid), (2, 2), 0.9)
    out = conditional_pooling(x, state, (2, 2), 0.9)
    gbm = bf_gbm(clap.state.with_tokens(out), 5)
    out2 = global_merge(out, state, 5)
    counts = (x.shape[1], out.shape[1], out2.shape[1])
    expected = (x.shape[1], clap.state.num_tokens, gbm.state.num_tokens)
    assert_well_conditioned(clap)
    assert_well_conditioned(gbm)
    assert counts == expected, f"token counts {counts}, brute force {expected}"
    assert expected[0] > expected[1] > expected[2], f"token counts {expected} (CLAP r={clap.r}, GBM r={gbm.r})"
    assert_same(out2, state, gbm.state)
