"""The dense/sparse oracle of sheafdist.sheaf: paper.md section 9, checks 1-3.

1. the restricted coboundary is block lower unitriangular, det = 1;
2. L[Omega,Omega] from the assembled coboundary equals the block formula (A.5)
   and delta_free^T delta_free, and is positive definite for every pattern;
3. the harmonic extension is the forward pass.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg

from sheafdist import sheaf
from sheafdist.model import MLP, forward, he_init, phi

ARCHS = [[2, 4, 1], [3, 5, 2], [2, 6, 4, 1], [3, 8, 6, 2], [2, 6, 4, 4, 1],
         [4, 8, 6, 4, 3]]
SEEDS = [0, 1, 2, 3, 4]


def random_model(arch, seed, output="identity", bias_scale=0.5) -> MLP:
    """He weights with nonzero random biases (He init alone has zero biases)."""
    rng = np.random.default_rng(seed)
    model = he_init(arch, rng, output)
    model.b = [bias_scale * rng.standard_normal(b.shape) for b in model.b]
    return model


def omega_order(arch) -> list[tuple[str, int]]:
    K = len(arch) - 1
    order = []
    for layer in range(1, K + 1):
        order.append((f"z{layer}", arch[layer]))
        if layer < K:
            order.append((f"a{layer}", arch[layer]))
    return order


def numpy_forward(model: MLP, x: np.ndarray) -> dict[str, np.ndarray]:
    """A plain forward pass written here, independent of sheafdist.model."""
    out, a = {}, x
    for layer, (w, b) in enumerate(zip(model.W, model.b, strict=True), start=1):
        z = w @ a + b
        out[f"z{layer}"] = z
        if layer < model.depth:
            a = np.where(z >= 0, z, 0.0)
            out[f"a{layer}"] = a
    return out


def rel_err(mine: np.ndarray, ref: np.ndarray, floor: float = 1e-300) -> float:
    """Relative 2-norm error; ``floor`` stands in for a (near) zero reference,
    e.g. a layer whose units are all off."""
    return float(np.linalg.norm(mine - ref) / max(np.linalg.norm(ref), floor))


def column_norm(state: dict[str, np.ndarray], j: int) -> float:
    return float(np.sqrt(sum(np.sum(s[:, j] ** 2) for s in state.values())))


# ------------------------------------------------------------ check 1


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_restricted_coboundary_is_block_lower_unitriangular(arch):
    order = omega_order(arch)
    n_free = sum(n for _, n in order)
    assert n_free == 2 * sum(arch[1:-1]) + arch[-1]
    worst = 0.0
    for seed in SEEDS:
        model = random_model(arch, seed)
        rng = np.random.default_rng(1000 + seed)
        for _ in range(3):
            pattern = sheaf.random_pattern(model, rng)
            cb = sheaf.coboundary(model, pattern)
            # Omega is ordered z1, a1, z2, ..., zK in consecutive blocks
            assert list(cb.blocks) == [name for name, _ in order]
            start = 0
            for name, n in order:
                assert cb.blocks[name] == slice(start, start + n)
                start += n
            D = cb.delta_free.toarray()
            assert D.shape == (n_free, n_free), "square: dim C^1 = dim Omega"
            assert len(cb.free) + len(cb.boundary) == cb.delta.shape[1]
            assert len(set(cb.free) & set(cb.boundary)) == 0
            # block structure: identity diagonal blocks, nothing above them
            for i, (name_i, _) in enumerate(order):
                rows_i = cb.blocks[name_i]
                assert np.array_equal(
                    D[rows_i, rows_i], np.eye(rows_i.stop - rows_i.start)
                ), name_i
                for name_j, _ in order[i + 1:]:
                    assert not np.any(D[rows_i, cb.blocks[name_j]]), (name_i, name_j)
            assert np.array_equal(np.diag(D), np.ones(n_free))
            assert not np.any(np.triu(D, 1))
            # the off-diagonal blocks are -R_l and -W_l, in the right places
            for layer in range(1, len(arch) - 1):
                z, a = cb.blocks[f"z{layer}"], cb.blocks[f"a{layer}"]
                assert np.array_equal(D[a, z], -np.diag(pattern[layer - 1]))
                z_next = cb.blocks[f"z{layer + 1}"]
                assert np.array_equal(D[z_next, a], -model.W[layer])
            # det delta_free = det L[Omega,Omega] = 1, via LU
            sign, logdet = np.linalg.slogdet(D)
            assert sign == 1.0
            worst = max(worst, abs(np.exp(logdet) - 1.0))
            L_oo, _ = cb.blocks_of_laplacian()
            lu, piv = scipy.linalg.lu_factor(L_oo.toarray())
            det_L = np.prod(np.diag(lu)) * (-1.0) ** np.count_nonzero(
                piv != np.arange(len(piv))
            )
            worst = max(worst, abs(det_L - 1.0))
    assert worst < 1e-12


# ------------------------------------------------------------ check 2


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_free_laplacian_matches_block_formula(arch):
    for seed in SEEDS:
        model = random_model(arch, seed)
        rng = np.random.default_rng(2000 + seed)
        for _ in range(3):
            pattern = sheaf.random_pattern(model, rng)
            cb = sheaf.coboundary(model, pattern)
            L_oo, L_ou = cb.blocks_of_laplacian()
            L_oo = L_oo.toarray()
            D = cb.delta_free.toarray()
            block = sheaf.block_laplacian(model, pattern)
            assert block.shape == L_oo.shape
            assert np.max(np.abs(L_oo - block)) < 1e-12
            assert np.max(np.abs(L_oo - D.T @ D)) < 1e-12
            assert np.array_equal(L_oo, L_oo.T)
            # L[Omega,U] c_U = delta_free^T delta_U c_U, and -L[Omega,U] c_U has
            # the closed form of paper.md 2.4/2.7
            x = rng.standard_normal(arch[0])
            c_u = sheaf.boundary_values(model, x)
            rhs = -(L_ou @ c_u)
            expected = np.zeros(L_oo.shape[0])
            W, b = model.W, [bb[:, 0] for bb in model.b]
            expected[cb.blocks["z1"]] = W[0] @ x + b[0]
            for layer in range(2, len(arch)):
                expected[cb.blocks[f"z{layer}"]] += b[layer - 1]
                expected[cb.blocks[f"a{layer - 1}"]] += -W[layer - 1].T @ b[layer - 1]
            assert np.max(np.abs(rhs - expected)) < 1e-12
            assert np.max(
                np.abs(rhs + D.T @ (cb.delta_boundary.toarray() @ c_u))
            ) < 1e-12


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_laplacian_is_positive_definite_for_all_16_patterns_of_241(seed):
    model = random_model([2, 4, 1], seed)
    patterns = [np.array(p, dtype=float) for p in itertools.product([0, 1], repeat=4)]
    assert len({tuple(p) for p in patterns}) == 16
    lam_mins = []
    for p in patterns:
        L_oo, _ = sheaf.coboundary(model, [p]).blocks_of_laplacian()
        lam = scipy.linalg.eigvalsh(L_oo.toarray())
        assert lam[0] > 0
        # det = 1: the eigenvalues multiply to 1, so lambda_min <= 1 <= lambda_max
        assert np.sum(np.log(lam)) == pytest.approx(0.0, abs=1e-12)
        assert lam[0] <= 1.0 + 1e-12 <= lam[-1] + 2e-12
        lam_mins.append(lam[0])
    # uniform positive definiteness: lambda_* = min over patterns is bounded away
    assert min(lam_mins) > 1e-3


@pytest.mark.parametrize("arch", [[2, 6, 4, 1], [3, 8, 6, 2]], ids=str)
def test_laplacian_is_positive_definite_for_random_patterns(arch):
    for seed in SEEDS:
        model = random_model(arch, seed)
        rng = np.random.default_rng(seed)
        for _ in range(4):
            L_oo, _ = sheaf.coboundary(
                model, sheaf.random_pattern(model, rng)
            ).blocks_of_laplacian()
            assert scipy.linalg.eigvalsh(L_oo.toarray())[0] > 0


# ------------------------------------------------------------ check 3


def test_harmonic_extension_is_the_forward_pass_241_net_100_inputs():
    model = random_model([2, 8, 1], 11)
    x = np.random.default_rng(12).standard_normal((2, 120))
    ext = sheaf.harmonic_extension(model, x)
    fwd = forward(model, x)
    ref = numpy_forward(model, x)
    assert set(ext) == {"a0", "z1", "a1", "z2"} == set(fwd)
    assert np.array_equal(ext["a0"], x)
    for j in range(x.shape[1]):
        scale = column_norm(ref, j)
        for v in ("z1", "a1", "z2"):
            assert rel_err(ext[v][:, j], fwd[v][:, j], scale) <= 1e-10, (v, j)
            assert rel_err(ext[v][:, j], ref[v][:, j], scale) <= 1e-10, (v, j)
    # both ReLU states actually occur, so the pattern really varies
    mask = fwd["z1"] >= 0
    assert mask.any() and (~mask).any()
    assert len({tuple(c) for c in mask.T}) > 3


@pytest.mark.parametrize(
    "arch", [[2, 6, 4, 1], [3, 8, 6, 2], [2, 6, 4, 4, 1], [4, 8, 6, 4, 3]], ids=str
)
def test_harmonic_extension_is_the_forward_pass_deeper(arch):
    model = random_model(arch, sum(arch))
    x = np.random.default_rng(len(arch)).standard_normal((arch[0], 25))
    ext = sheaf.harmonic_extension(model, x)
    fwd = numpy_forward(model, x)
    assert set(ext) - {"a0"} == set(fwd)
    for j in range(x.shape[1]):
        scale = column_norm(fwd, j)
        for v in fwd:
            assert rel_err(ext[v][:, j], fwd[v][:, j], scale) <= 1e-10, (v, j)
        # one direct solve with the forward pattern gives the same section
        pattern = sheaf.forward_pattern(model, x[:, j])
        sol = sheaf.solve_with_pattern(model, x[:, j], pattern)
        for v in fwd:
            assert rel_err(sol[v][:, 0], fwd[v][:, j], scale) <= 1e-10, (v, j)


def test_solve_with_a_wrong_pattern_is_not_the_forward_pass():
    """The pattern matters: the check above would fail with the wrong one."""
    model = random_model([2, 8, 1], 3)
    x = np.array([0.7, -1.2])
    pattern = sheaf.forward_pattern(model, x)
    flipped = [1.0 - pattern[0]]
    sol = sheaf.solve_with_pattern(model, x, flipped)
    fwd = numpy_forward(model, x[:, None])
    assert rel_err(sol["a1"][:, 0], fwd["a1"][:, 0]) > 1e-3
    assert rel_err(sol["z1"][:, 0], fwd["z1"][:, 0]) <= 1e-10  # z1 = W1 x + b1


@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_nonlinear_output_gives_a_out_phi_of_z(output):
    arch = [3, 7, 5, 4]
    model = random_model(arch, 5, output)
    x = np.random.default_rng(6).standard_normal((3, 30))
    ext = sheaf.harmonic_extension(model, x)
    z = numpy_forward(model, x)["z3"]
    if output == "sigmoid":
        expected = 1.0 / (1.0 + np.exp(-z))
    else:
        e = np.exp(z)
        expected = e / e.sum(axis=0, keepdims=True)
        assert np.allclose(ext["a_out"].sum(axis=0), 1.0, rtol=0, atol=1e-14)
    assert rel_err(ext["z3"], z) <= 1e-10
    assert rel_err(ext["a_out"], expected) <= 1e-10
    assert np.allclose(ext["a_out"], phi(output, ext["z3"]), rtol=1e-14, atol=0)
    assert np.allclose(ext["a_out"], forward(model, x)["a_out"], rtol=1e-10, atol=0)
    # the output edge stays out of the linear coboundary
    cb = sheaf.coboundary(model, sheaf.forward_pattern(model, x[:, 0]))
    assert "a_out" not in cb.blocks
    assert cb.delta_free.shape == (2 * 12 + 4, 2 * 12 + 4)
