"""DBiLD: the O(k) cumulative path against explicit pairs, and the loss's properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from switchkd_plugin.losses import dbild_loss, full_kl_loss, kneedle_k

F64 = torch.float64
OPTION_GRID = list(
    itertools.product(("kneedle", "fixed"), ("rkl", "fkl"), ("both", "teacher", "student"))
)


def _logits(*shape: int, seed: int, scale: float = 1.0, dtype=F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A heavy head makes the knee land at varied k, as in real LM logits.
    base = torch.randn(*shape, generator=gen, dtype=F64)
    head = torch.rand(*shape, generator=gen, dtype=F64) ** 8 * 6
    return ((base + head) * scale).to(dtype)


def _fast_and_reference(student, teacher, mask=None, **options):
    """(value, grad) of the cumulative path and of the explicit-pairs reference."""
    out = []
    for algorithm in ("cumulative", "explicit"):
        s = student.detach().clone().requires_grad_(True)
        loss = dbild_loss(s, teacher, mask, pair_algorithm=algorithm, **options)
        loss.backward()
        out.append((loss.detach(), s.grad))
    return out


def _assert_close_rel(actual, expected, rtol=1e-6, atol=1e-12):
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale + atol, f"max abs error {err:.3e} vs scale {scale:.3e}"


def _assert_fast_matches_reference(results, rtol=1e-6):
    """Values to `rtol`; gradients to `rtol`, with round-off allowed at 1e-12 of the loss's size
    (a saturated pair softmax has gradients that are exactly 0 in one path, ~1e-14 x loss in the
    other)."""
    (fast, g_fast), (ref, g_ref) = results
    _assert_close_rel(fast, ref, rtol)
    _assert_close_rel(g_fast, g_ref, rtol, atol=1e-12 * max(1.0, ref.abs().item()))


@pytest.mark.parametrize(("k_mode", "divergence", "directions"), OPTION_GRID)
@pytest.mark.parametrize("shape", [(13, 40), (3, 5, 40)])
def test_fast_equals_explicit_over_option_grid(k_mode, divergence, directions, shape):
    student, teacher = _logits(*shape, seed=1), _logits(*shape, seed=2)
    options = dict(
        k_mode=k_mode, divergence=divergence, directions=directions, fixed_k=11, temperature=2.0
    )
    results = _fast_and_reference(student, teacher, **options)
    assert results[0][0].item() > 0
    _assert_fast_matches_reference(results)


def _window_and_k_bounds(vocab: int):
    """(window, k_min, k_max) combinations that are valid for `vocab` (the rest raise)."""
    for window, (k_min, k_max) in itertools.product(
        (2, 3, 7, vocab - 1, vocab, 0, -1, 1000), ((2, None), (2, 2), (5, 5), (3, 30), (2, 400))
    ):
        width = vocab if window <= 0 else min(window, vocab)
        if k_min <= min(k_max or width, width):
            yield window, k_min, k_max


@pytest.mark.parametrize(("window", "k_min", "k_max"), list(_window_and_k_bounds(40)))
def test_fast_equals_explicit_over_windows_and_k_bounds(window, k_min, k_max):
    vocab = 40
    width = vocab if window <= 0 else min(window, vocab)
    student, teacher = _logits(17, vocab, seed=3), _logits(17, vocab, seed=4)
    options = dict(kneedle_window=window, k_min=k_min, k_max=k_max, temperature=1.5)
    _assert_fast_matches_reference(_fast_and_reference(student, teacher, **options))
    out = dbild_loss(student, teacher, return_stats=True, **options)
    upper = min(k_max or width, width)
    for k in (out.stats.teacher_k, out.stats.student_k):
        assert int(k.min()) >= k_min and int(k.max()) <= upper


@pytest.mark.parametrize(
    "case", ["flat_rows", "ties", "magnitude_1e4", "k_at_both_bounds", "masked_empty_rows"]
)
def test_fast_equals_explicit_on_hard_inputs(case):
    student, teacher = _logits(4, 6, 60, seed=5), _logits(4, 6, 60, seed=6)
    mask, options = None, dict(temperature=3.0)
    if case == "flat_rows":
        student[0, :2] = 1.5
        teacher[1, 3:] = -2.0
    elif case == "ties":
        student, teacher = student.round(), (teacher * 0.5).round()
    elif case == "magnitude_1e4":
        student, teacher = student * 1e4, teacher * 1e4
    elif case == "k_at_both_bounds":
        teacher[0] = 0.0
        teacher[0, :, 0] = 50.0  # one dominant logit over a flat rest: knee 1, k = 2 -> k_min
        # A concave curve lies above the chord: d <= 0, first argmax 0 -> k_min.
        student[1] = 1 - torch.linspace(0, 1, 60, dtype=F64) ** 2
        teacher[2] = 0.0
        teacher[2, :, :20] = torch.linspace(10, 9, 20, dtype=F64)  # a plateau: knee 20 -> k_max
        options.update(k_min=3, k_max=9, kneedle_window=30)
    elif case == "masked_empty_rows":
        gen = torch.Generator().manual_seed(7)
        mask = torch.rand(4, 6, generator=gen) < 0.4
        mask[2] = False  # a sequence with no response token
    results = _fast_and_reference(student, teacher, mask, **options)
    _assert_fast_matches_reference(results)
    if case == "k_at_both_bounds":
        stats = dbild_loss(student, teacher, return_stats=True, **options).stats
        assert stats.teacher_k[:6].eq(3).all() and stats.student_k[6:12].eq(3).all()
        assert stats.teacher_k[12:18].eq(9).all()
    if mask is not None:
        assert results[0][1][~mask].abs().max() == 0


def test_explicit_reference_equals_brute_force_pairs():
    """The reference itself, against the definition written as plain loops over pairs."""
    student, teacher = _logits(5, 30, seed=8), _logits(5, 30, seed=9)
    tau = 2.0
    for divergence in ("rkl", "fkl"):
        per_row = dbild_loss(
            student, teacher, temperature=tau, divergence=divergence, reduction="none",
            pair_algorithm="explicit", kneedle_window=20,
        )  # fmt: skip
        k_t = kneedle_k(teacher, window=20)
        k_s = kneedle_k(student, window=20)
        for row in range(5):
            total = 0.0
            for leader, k in ((teacher[row], k_t[row]), (student[row], k_s[row])):
                ids = leader.argsort(descending=True)[: int(k)].tolist()
                a = [teacher[row, i].item() / tau for i in ids]
                b = [student[row, i].item() / tau for i in ids]
                pairs = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))]
                za = sum(math.exp(a[i] - a[j]) for i, j in pairs)
                zb = sum(math.exp(b[i] - b[j]) for i, j in pairs)
                p = [math.exp(a[i] - a[j]) / za for i, j in pairs]
                q = [math.exp(b[i] - b[j]) / zb for i, j in pairs]
                first, second = (q, p) if divergence == "rkl" else (p, q)
                total += sum(x * math.log(x / y) for x, y in zip(first, second, strict=True))
            assert per_row[row].item() == pytest.approx(total, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("k_mode", "divergence", "directions"), OPTION_GRID)
def test_zero_when_student_equals_teacher(k_mode, divergence, directions):
    logits = _logits(9, 50, seed=10)
    loss = dbild_loss(logits, logits.clone(), k_mode=k_mode, divergence=divergence,
                      directions=directions)  # fmt: skip
    assert loss.item() == 0.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("k_mode", "divergence"), [("kneedle", "rkl"), ("fixed", "fkl")])
def test_non_negative_and_shift_invariant(seed, k_mode, divergence):
    student, teacher = _logits(8, 3, 70, seed=seed), _logits(8, 3, 70, seed=seed + 100)
    options = dict(k_mode=k_mode, divergence=divergence, reduction="none")
    base = dbild_loss(student, teacher, **options)
    assert (base >= -1e-12).all()
    gen = torch.Generator().manual_seed(seed)
    shift_s = torch.randn(8, 3, 1, generator=gen, dtype=F64) * 50
    shift_t = torch.randn(8, 3, 1, generator=gen, dtype=F64) * 50
    for s, t in ((student + shift_s, teacher), (student, teacher + shift_t)):
        _assert_close_rel(dbild_loss(s, t, **options), base, rtol=1e-9)


def test_no_gradient_reaches_teacher_and_masked_rows_change_nothing():
    student = _logits(2, 5, 30, seed=11).requires_grad_(True)
    teacher = _logits(2, 5, 30, seed=12).requires_grad_(True)
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    loss = dbild_loss(student, teacher, mask)
    loss.backward()
    assert teacher.grad is None
    assert student.grad[~mask].abs().max() == 0 and student.grad[mask].abs().max() > 0
    noisy_s, noisy_t = student.detach().clone(), teacher.detach().clone()
    noisy_s[~mask] = torch.randn_like(noisy_s[~mask]) * 100
    noisy_t[~mask] = float("nan")  # never read: masked rows are dropped before anything else
    assert dbild_loss(noisy_s, noisy_t, mask).item() == loss.item()


def test_k_equal_two_contributes_zero():
    student, teacher = _logits(10, 30, seed=13), _logits(10, 30, seed=14)
    assert dbild_loss(student, teacher, k_mode="fixed", fixed_k=2).item() == pytest.approx(
        0, abs=1e-15
    )
    assert dbild_loss(student, teacher, k_max=2).item() == pytest.approx(0, abs=1e-15)
    # One branch pinned at k = 2 adds nothing to the other branch.
    teacher_only = dbild_loss(student, teacher, directions="teacher", reduction="none")
    teacher[:, 0] = 1e3  # now every teacher-led row has k = k_min = 2
    student_only = dbild_loss(student, teacher, directions="student", reduction="none")
    both = dbild_loss(student, teacher, reduction="none")
    assert dbild_loss(student, teacher, directions="teacher").item() == pytest.approx(0, abs=1e-12)
    _assert_close_rel(both, student_only, rtol=1e-12)
    assert teacher_only.gt(0).any()


@pytest.mark.parametrize("low_precision", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_the_float32_answer(low_precision):
    student = _logits(6, 4, 80, seed=15, dtype=low_precision).requires_grad_(True)
    teacher = _logits(6, 4, 80, seed=16, dtype=low_precision)
    upcast_student = student.detach().float().requires_grad_(True)
    loss = dbild_loss(student, teacher)
    reference = dbild_loss(upcast_student, teacher.float())
    assert loss.dtype == torch.float32 and loss.item() == reference.item()
    loss.backward()
    reference.backward()
    assert student.grad.dtype == low_precision
    # Only the gathered [n, K] values are upcast, so an id picked by both branches gets two
    # contributions, each rounded to the low precision before they are summed there: at most
    # two roundings (eps each, relative to the largest gradient) apart from the upcast path.
    eps = torch.finfo(low_precision).eps
    _assert_close_rel(student.grad.float(), upcast_student.grad, rtol=2 * eps, atol=0)
    once = upcast_student.grad.to(low_precision)
    assert (student.grad == once).float().mean() > 0.9  # elsewhere: the same rounding


def test_all_false_mask_gives_zero_and_backward_works():
    student = _logits(3, 20, seed=17).requires_grad_(True)
    mask = torch.zeros(3, dtype=torch.bool)
    for loss in (
        dbild_loss(student, student.detach() + 1, mask),
        full_kl_loss(student, student, mask),
    ):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.equal(grad, torch.zeros_like(student))
    out = dbild_loss(student, student.detach(), mask, return_stats=True)
    assert out.stats.summary() == {}


def test_stats_report_the_chosen_k():
    student, teacher = _logits(4, 7, 90, seed=18), _logits(4, 7, 90, seed=19)
    mask = torch.rand(4, 7, generator=torch.Generator().manual_seed(0)) < 0.6
    out = dbild_loss(student, teacher, mask, return_stats=True, kneedle_window=64)
    assert torch.equal(out.stats.teacher_k, kneedle_k(teacher[mask], window=64))
    assert torch.equal(out.stats.student_k, kneedle_k(student[mask], window=64))
    summary = out.stats.summary()
    k_t = kneedle_k(teacher[mask], window=64).double()
    assert summary["k_teacher_mean"] == pytest.approx(k_t.mean().item())
    assert summary["k_teacher_max"] == k_t.max().item()
    assert summary["k_teacher_at_min"] == pytest.approx((k_t == 2).double().mean().item())
    fixed = dbild_loss(student, teacher, k_mode="fixed", fixed_k=5, return_stats=True).stats
    assert fixed.teacher_k.eq(5).all() and fixed.student_k.eq(5).all()


def test_bild_setting_matches_its_definition():
    """BiLD = fixed top-8, forward KL, both directions; checked against the explicit pairs."""
    student, teacher = _logits(6, 50, seed=20), _logits(6, 50, seed=21)
    bild = dbild_loss(student, teacher, k_mode="fixed", fixed_k=8, divergence="fkl")
    reference = dbild_loss(
        student, teacher, k_mode="fixed", fixed_k=8, divergence="fkl", pair_algorithm="explicit"
    )
    assert bild.item() == pytest.approx(reference.item(), rel=1e-10)
