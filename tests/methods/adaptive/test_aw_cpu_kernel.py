"""The compiled CPU kernel of the adaptive rescaling (cpu_kernel.cpp) against independent computations:
the generic autograd path of the importance vector (CDF differences, Errica et al. 2025), finite differences
(gradcheck), and the PyTorch path of the same layer; and its loader's fallbacks."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from widthlab.methods.adaptive import cpu_kernel
from widthlab.methods.adaptive.distributions import Exponential, ImportanceDistribution, _host_importance
from widthlab.methods.adaptive.mlp import adaptive_mlp
from widthlab.methods.adaptive.resnet import adaptive_resnet20

pytestmark = pytest.mark.numerics  # a compiled kernel against PyTorch operations: other summation orders

# (shape of t, unit axis, support): Linear activations, a weight folded by columns, conv channels.
CASES = [((64, 232), -1, None), ((3, 40), 1, 57), ((5, 7, 4, 3), 1, None), ((6, 9), 0, 12), ((2, 11), -1, 11)]


def reference(t: torch.Tensor, r0: float, dim: int, support):
    """t ⊙ p by the generic CDF-difference path of the base class, in float64, with its autograd graph."""
    dist = Exponential(0.3).double()
    with torch.no_grad():
        dist.r.fill_(r0)
    D = t.shape[dim]
    p = ImportanceDistribution.importance(dist, D, support)
    shape = [1] * t.dim()
    shape[dim] = D
    return t * p.reshape(shape), dist.r


@pytest.mark.parametrize("shape, dim, support", CASES)
@pytest.mark.parametrize("r0", [-4.6, 0.4, 25.0])
def test_kernel_matches_the_generic_path_and_finite_differences(kernel, shape, dim, support, r0):
    torch.manual_seed(0)
    t = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    n = shape[dim] if support is None else support
    r = torch.tensor(r0, dtype=torch.float64, requires_grad=True)
    out = kernel.exponential_scale(t, r, n, dim)
    ref, r_ref = reference(t, r0, dim, support)
    g = torch.randn_like(out)
    gt, gr = torch.autograd.grad(out, (t, r), g)
    gt_ref, gr_ref = torch.autograd.grad(ref, (t, r_ref), g)
    assert torch.allclose(out, ref, rtol=1e-13, atol=1e-300)
    assert torch.allclose(gt, gt_ref, rtol=1e-13, atol=1e-300)
    assert torch.allclose(gr, gr_ref, rtol=1e-9, atol=1e-15)
    assert gr.shape == r.shape and gr.dtype == r.dtype
    small = t.detach()[(slice(0, 2),) * (dim % t.dim()) + (slice(None),)].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, r: kernel.exponential_scale(t, r, n, dim), (small, r))


@pytest.mark.parametrize("r0, D, n", [(-4.6, 232, 232), (-4.6, 200, 232), (0.4, 6, 6), (25.0, 2, 5),
                                      (-9.0, 300, 300), (-12.0, 4607, 4607)])
def test_kernel_table_is_the_host_closed_form(kernel, r0, D, n):
    """p and dp/dr from C++ equal numpy's evaluation of the same closed form to float64 rounding."""
    got = kernel.exponential_importance(r0, D, n).numpy()
    want = _host_importance(r0, D, n)
    # Elementwise to float64 rounding; dp/dr crosses zero, so its tolerance is relative to its scale.
    assert np.allclose(got[0], want[0], rtol=1e-13, atol=0)
    assert np.allclose(got[1], want[1], rtol=0, atol=1e-13 * np.abs(want[1]).max())


@pytest.mark.parametrize("shape, dim, support", CASES)
def test_kernel_and_pytorch_paths_agree_in_float32(kernel, shape, dim, support):
    """The layer computes the same thing either way, to float32 rounding: p is the same float64 closed
    form rounded once (numpy's exp and the C library's may differ in the last bit), and the kernel
    sums dL/dr in float64."""
    torch.manual_seed(1)
    dist = Exponential(0.01)
    t = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)

    def run():
        out = dist.scale(t, dim, support)
        return (out, *torch.autograd.grad(out, (t, dist.r), g))

    out_k, gt_k, gr_k = run()
    assert out_k.grad_fn.name().endswith("ExponentialScale>")  # the kernel's one node
    with cpu_kernel.disabled():
        out_p, gt_p, gr_p = run()
    assert torch.allclose(out_k, out_p, rtol=2.4e-7, atol=0)
    assert torch.allclose(gt_k, gt_p, rtol=2.4e-7, atol=0)
    assert torch.allclose(gr_k, gr_p, rtol=1e-5, atol=1e-8)


def test_kernel_survives_an_in_place_update_of_r_before_backward(kernel):
    """r is not saved for backward (only its shape and dtype): an optimizer-style in-place update of r
    between forward and backward leaves the graph valid, as on the PyTorch path."""
    dist = Exponential(0.01)
    t = torch.randn(8, 232, requires_grad=True)
    out = dist.scale(t)
    with torch.no_grad():
        dist.r.add_(1e-3)
    out.sum().backward()
    assert dist.r.grad is not None and torch.isfinite(dist.r.grad)


def test_kernel_without_grad_and_for_inputs_that_need_none(kernel):
    dist = Exponential(0.01)
    t = torch.randn(4, 232)
    with torch.no_grad():
        out = dist.scale(t)
    assert out.grad_fn is None
    with cpu_kernel.disabled():
        assert torch.equal(out, dist.scale(t).detach())
    dist.r.requires_grad_(False)
    t.requires_grad_(True)
    dist.scale(t).sum().backward()
    assert t.grad is not None and dist.r.grad is None


def test_kernel_rejects_bad_input_with_a_clear_error_and_declines_other_dtypes(kernel):
    r = torch.tensor(-4.6)
    # Tensors it does not handle are handed back to the PyTorch path (None), not refused.
    assert kernel.exponential_scale(torch.ones(3, 4, dtype=torch.bfloat16), r, 4, -1) is None
    with pytest.raises(RuntimeError, match="no axis 2"):
        kernel.exponential_scale(torch.ones(3, 4), r, 4, 2)
    with pytest.raises(RuntimeError, match="one value"):
        kernel.exponential_scale(torch.ones(3, 4), torch.ones(2), 4, -1)


@pytest.mark.parametrize("hidden_layers", [1, 2])
def test_training_on_either_path_gives_the_same_widths_and_weights(kernel, hidden_layers):
    """Forty Adam steps of an adaptive MLP on both paths: both fold and rescale the activations (the
    2-layer net does both), r moves every step, and the runs stay together to float32 rounding."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 2), torch.randint(0, 2, (128,))

    def train():
        torch.manual_seed(0)
        m = adaptive_mlp(2, 2, lam0=0.01, hidden_layers=hidden_layers)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return m

    a = train()
    with cpu_kernel.disabled():
        b = train()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-6), name
    assert float(a.scales[0].dist.r.detach()) != pytest.approx(-4.600166, abs=1e-3)  # r did move


def test_adaptive_convolution_channels_use_the_kernel(kernel):
    """ResNet-20 with adaptive channels rescales (B, C, H, W) along axis 1 through the kernel."""
    torch.manual_seed(0)
    model = adaptive_resnet20((3, 8, 8), 10, width=4, adaptive_channels=True, channels_lam0=0.3)
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    out.sum().backward()
    with cpu_kernel.disabled():
        model.zero_grad()
        ref = model(x)
        ref.sum().backward()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.fixture
def first_load():
    """The loader as in a new process (no attempt yet); the session's loaded kernel comes back after."""
    saved = dict(cpu_kernel._state)
    cpu_kernel.reset()
    yield
    cpu_kernel._state.update(saved)


def test_a_failed_build_warns_once_and_leaves_the_pytorch_path(monkeypatch, first_load):
    def broken(verbose):
        raise OSError("c++: command not found")

    monkeypatch.setattr(cpu_kernel, "_compile", broken)
    with pytest.warns(RuntimeWarning, match="command not found"):
        assert cpu_kernel.load() is None
    assert cpu_kernel.module() is None  # no second attempt, no second warning
    with pytest.raises(RuntimeError, match="command not found"):
        cpu_kernel.load(strict=True)
    dist = Exponential(0.01)
    t = torch.randn(4, 232)
    assert torch.allclose(dist.scale(t), t * dist.importance(232))


def test_the_switch_turns_the_kernel_off_without_building(monkeypatch, first_load):
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "off")
    monkeypatch.setattr(cpu_kernel, "_compile", lambda verbose: pytest.fail("built although switched off"))
    assert cpu_kernel.module() is None
    with pytest.raises(RuntimeError, match="is off"):
        cpu_kernel.load(strict=True)


def test_build_folder_pins_the_source(monkeypatch, tmp_path):
    """A changed kernel source builds into a new folder: a stale library is never imported."""
    monkeypatch.setenv(cpu_kernel.ENV_DIR, str(tmp_path))
    first = cpu_kernel.build_dir()
    assert first.parent == tmp_path and torch.__version__.replace("+", "_") in first.name
    changed = tmp_path / "cpu_kernel.cpp"
    changed.write_bytes(cpu_kernel.SOURCE.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", changed)
    assert cpu_kernel.build_dir() != first


def test_build_command_reports_where_the_kernel_is_or_why_not(kernel, monkeypatch, capsys, first_load):
    from widthlab.cli import main

    assert main(["build-cpu-kernel"]) == 0  # loads the built library in this fresh state
    assert str(cpu_kernel.build_dir()) in capsys.readouterr().out
    cpu_kernel.reset()
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "off")
    assert main(["build-cpu-kernel"]) == 1
    err = capsys.readouterr().err
    assert "WIDTHLAB_CPU_KERNEL is off" in err and "PyTorch operations" in err


def test_double_backward_keeps_the_graph_to_t(kernel):
    """A gradient penalty through the layer: d/dt ||dL/dt||^2 matches the PyTorch path (p is a constant
    of the second-order graph on both paths, which linearise p around r's value)."""
    torch.manual_seed(0)
    dist = Exponential(0.3).double()
    t0 = torch.randn(5, 9, dtype=torch.float64)

    def penalty_grad():
        t = t0.clone().requires_grad_(True)
        loss = (dist.scale(t) ** 2).sum() + (t**3).sum()
        (gt,) = torch.autograd.grad(loss, t, create_graph=True)
        return torch.autograd.grad((gt**2).sum(), t)[0]

    got = penalty_grad()
    with cpu_kernel.disabled():
        want = penalty_grad()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_two_threads_agree_with_one_and_with_themselves(kernel):
    torch.manual_seed(0)
    dist = Exponential(0.05)
    t = torch.randn(64, 64, 16, 16, requires_grad=True)
    g = torch.randn_like(t)
    threads = torch.get_num_threads()

    def run(n):
        torch.set_num_threads(n)
        out = dist.scale(t, 1)
        return (out, *torch.autograd.grad(out, (t, dist.r), g))

    try:
        one, two, again = run(1), run(2), run(2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(two, again))  # deterministic
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.allclose(one[2], two[2], rtol=1e-5)  # dL/dr: partial sums in another grouping


def test_layouts_and_dtypes_the_kernel_declines_take_the_pytorch_path(kernel):
    dist = Exponential(0.3)
    r = dist.r
    w = torch.randn(9, 5).t()  # a transposed weight: units along its last axis, not contiguous
    assert kernel.exponential_scale(w, r, 0, -1) is None
    assert torch.allclose(dist.scale(w), w * dist.importance(9))
    a = torch.randn(2, 6, 4, 4).to(memory_format=torch.channels_last)
    assert kernel.exponential_scale(a, r, 0, 1) is None
    out = dist.scale(a, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)  # as t * p keeps it
    assert kernel.exponential_scale(torch.randn(3, 6, dtype=torch.float64), r, 0, -1) is None  # r float32
    empty = torch.randn(0, 232, requires_grad=True)
    out = dist.scale(empty)
    out.sum().backward()
    assert out.shape == (0, 232) and empty.grad.shape == (0, 232) and float(dist.r.grad) == 0.0


def test_function_transforms_and_forward_mode_take_the_pytorch_path(kernel):
    """A C++ autograd node supports neither torch.func transforms nor forward-mode AD."""
    dist = Exponential(0.3)
    x = torch.randn(4, 3, 7)
    batched = torch.func.vmap(lambda t: dist.scale(t))(x)
    assert torch.allclose(batched, torch.stack([dist.scale(t) for t in x]))
    import torch.autograd.forward_ad as fwAD

    t, v = torch.randn(3, 7), torch.randn(3, 7)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(dist.scale(fwAD.make_dual(t, v))).tangent
    assert torch.allclose(tangent, v * dist.importance(7).detach())


def test_only_a_finished_build_is_imported_and_a_stale_lock_is_cleared(monkeypatch, tmp_path, first_load):
    """A library without its completion marker (a killed or running linker) is never imported, which
    could crash the process; the marker is written after a build, and a lock older than any build is
    removed instead of waited on forever."""
    import os
    import time

    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv(cpu_kernel.ENV_DIR, str(tmp_path))
    d = cpu_kernel.build_dir()
    d.mkdir(parents=True)
    (d / f"{cpu_kernel.NAME}.so").write_bytes(b"half a library")
    assert cpu_kernel._finished(d) is None  # no marker
    (d / "lock").write_text("")
    old = time.time() - cpu_kernel.STALE_LOCK_SECONDS - 60
    os.utime(d / "lock", (old, old))
    built = object()

    def fake_load(name, sources, build_directory, **kwargs):
        assert not (Path(build_directory) / "lock").exists()  # the stale lock is gone
        (Path(build_directory) / f"{name}.so").write_bytes(b"a whole library")
        return built

    monkeypatch.setattr(cpp, "load", fake_load)
    assert cpu_kernel._compile(verbose=False) is built
    assert cpu_kernel._finished(d) == d / f"{cpu_kernel.NAME}.so"  # marked complete
    (d / f"{cpu_kernel.NAME}.so").write_bytes(b"a whole library, changed")
    assert cpu_kernel._finished(d) is None  # the marker names size and hash


def test_a_build_error_keeps_its_end_where_the_compiler_says_what_failed():
    message = "RuntimeError: Error building extension: " + "c++ -O3 -I/include " * 100 + "c++: not found"
    short = cpu_kernel._shorten(message)
    assert short.endswith("c++: not found") and short.startswith("RuntimeError") and len(short) < 1100
