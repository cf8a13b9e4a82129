"""bilevel.projections against closed forms: the KKT system of min ½‖p − v‖² s.t. Ap = b, clamping, and
the variational inequality ⟨v − p, u − p⟩ ≤ 0 for feasible u."""

import pytest
import torch

from bilevel import BilevelError, projections

f64 = torch.float64


def kkt_projection(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Independent oracle: solve [[I, Aᵀ], [A, 0]] [p; ν] = [v; b] (least squares for rank-deficient A)."""
    m, n = a.shape
    kkt = torch.zeros(n + m, n + m, dtype=f64)
    kkt[:n, :n] = torch.eye(n, dtype=f64)
    kkt[:n, n:] = a.T
    kkt[n:, :n] = a
    rhs = torch.cat([v, b])
    return torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)[:n]


def test_box_and_nonnegative_are_clamps():
    """Closed form min(max(v, l), u), scalar and per-entry tensor bounds; nonnegative = max(v, 0)."""
    v = torch.linspace(-3, 3, 13, dtype=f64)
    torch.testing.assert_close(projections.box(-1.0, 2.0)(v), v.clamp(-1.0, 2.0), rtol=0, atol=0)
    low, high = torch.full((13,), -0.5, dtype=f64), torch.linspace(0, 1, 13, dtype=f64)
    torch.testing.assert_close(projections.box(low, high)(v), torch.minimum(torch.maximum(v, low), high), rtol=0, atol=0)
    torch.testing.assert_close(projections.nonnegative()(v), torch.relu(v), rtol=0, atol=0)
    out = projections.box(None, 0.0)({"a": v, "b": -v})
    assert set(out) == {"a", "b"} and float(out["a"].max()) == 0.0 and float(out["b"].max()) == 0.0


def test_hyperplane_matches_kkt():
    """{a·v = b}: v − (a·v − b)a/‖a‖² equals the KKT solution (≤1e-12) and is feasible."""
    gen = torch.Generator().manual_seed(0)
    a, v = torch.randn(7, generator=gen, dtype=f64), torch.randn(7, generator=gen, dtype=f64)
    p = projections.affine(a, 1.5)(v)
    torch.testing.assert_close(p, kkt_projection(a[None], torch.tensor([1.5], dtype=f64), v), rtol=0, atol=1e-12)
    assert abs(float(a @ p) - 1.5) < 1e-12


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_affine_matrix_matches_kkt(rank_deficient):
    """{Av = b}, A 3×8 (and a consistent rank-2 A with a repeated row): equals the KKT/least-squares solution
    (≤1e-10), satisfies Av = b, and ⟨v − p, u − p⟩ = 0 for another feasible u (orthogonality on an affine set)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 8, generator=gen, dtype=f64)
    if rank_deficient:
        a[2] = a[0]
    b = a @ torch.randn(8, generator=gen, dtype=f64)  # consistent
    v = torch.randn(8, generator=gen, dtype=f64)
    p = projections.affine(a, b)(v)
    torch.testing.assert_close(p, kkt_projection(a, b, v), rtol=0, atol=1e-10)
    torch.testing.assert_close(a @ p, b, rtol=0, atol=1e-10)
    u = p + (torch.eye(8, dtype=f64) - torch.linalg.pinv(a) @ a) @ torch.randn(8, generator=gen, dtype=f64)
    assert abs(float((v - p) @ (u - p))) < 1e-10


def test_dicts_flatten_in_key_order_and_dtype_follows_input():
    """A dict is one vector in key order: the projection of {x: (2,), y: (2, 2)} onto {1ᵀv = 0} subtracts the
    common mean (closed form), and a float32 input gives a float32 output."""
    proj = projections.affine(torch.ones(6, dtype=f64), 0.0)
    v = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[3.0, 4.0], [5.0, 9.0]])}
    out = proj(v)
    assert out["x"].dtype == torch.float32 and out["y"].shape == (2, 2)
    torch.testing.assert_close(out["x"], v["x"] - 4.0)
    torch.testing.assert_close(out["y"], v["y"] - 4.0)


def test_joint_on_keys_compose_product():
    """joint: the stacked (x, y) projected onto 1ᵀx + 1ᵀy = 0 (mean removal); on_keys leaves other keys; compose
    applies in order ([3, −0.5] → box [1, −0.5] → sum 1.5: [1.5, 0]); product projects each level."""
    x, y = torch.tensor([1.0, 3.0], dtype=f64), torch.tensor([2.0, 6.0], dtype=f64)
    px, py = projections.joint(projections.affine(torch.ones(4, dtype=f64)))(x, y)
    torch.testing.assert_close(px, x - 3.0)
    torch.testing.assert_close(py, y - 3.0)
    params = {"w": torch.tensor([-1.0, 2.0]), "b": torch.tensor(-5.0)}
    out = projections.on_keys("w", projections.nonnegative())(params)
    assert out["b"] is params["b"] and out["w"].tolist() == [0.0, 2.0]
    composed = projections.compose(projections.box(-1.0, 1.0), None, projections.affine(torch.ones(2, dtype=f64), 1.5))
    torch.testing.assert_close(composed(torch.tensor([3.0, -0.5], dtype=f64)), torch.tensor([1.5, 0.0], dtype=f64))
    qx, qy = projections.product(projections.nonnegative(), None)(-x, y)
    assert qx.tolist() == [0.0, 0.0] and qy is y


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: projections.box(2.0, 1.0), "low 2.0 exceeds high 1.0"),
        (lambda: projections.affine(torch.zeros(3)), "a is zero"),
        (lambda: projections.affine(torch.ones(2, 3), torch.ones(3)), "b has 3 entries but A has 2 rows"),
        (lambda: projections.affine(torch.ones(2, 2, 2)), "1-D tensor"),
        (lambda: projections.affine(torch.ones(4))(torch.ones(3)), "3 entries but a has 4"),
        (lambda: projections.on_keys("z", projections.nonnegative())({"w": torch.ones(2)}), r"keys \['z'\] not among"),
        (lambda: projections.compose(3), "must be callable"),
    ],
)
def test_errors(make, match):
    with pytest.raises(BilevelError, match=match):
        make()


def test_simplex_and_l2_ball():
    """Simplex: the result is on the simplex and is the closest point (no other simplex point among random ones is
    closer); ℓ2 ball: identity inside, radial scaling outside."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(7, generator=gen, dtype=torch.float64)
    p = projections.simplex(2.0)(v)
    assert float(p.min()) >= 0 and abs(float(p.sum()) - 2.0) < 1e-12
    others = torch.rand(2000, 7, generator=gen, dtype=torch.float64)
    others = 2.0 * others / others.sum(1, keepdim=True)
    assert float((p - v).norm()) <= float((others - v).norm(dim=1).min())
    ball = projections.l2_ball(1.5)
    inside = torch.tensor([0.3, -0.4], dtype=torch.float64)
    torch.testing.assert_close(ball(inside), inside)
    outside = {"a": torch.tensor([3.0, 0.0], dtype=torch.float64), "b": torch.tensor([4.0], dtype=torch.float64)}
    out = ball(outside)
    torch.testing.assert_close(out["a"], torch.tensor([0.9, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out["b"], torch.tensor([1.2], dtype=torch.float64))
    with pytest.raises(BilevelError, match="radius must be a finite number > 0"):
        projections.simplex(0.0)
