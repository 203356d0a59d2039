"""CSRLinear: same function, gradients and training trajectory as a masked dense Linear."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from widthlab.models.counting import count_nonzero_weights, count_weights, is_counted_layer
from widthlab.nn.sparse_linear import CSR_DENSITY_THRESHOLD, CSRLinear, use_sparse_path

# CSR kernels against masked dense GEMMs: one value, two summation orders; rerun under a second CPU
# kernel selection by scripts/test.sh.
pytestmark = pytest.mark.numerics

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def random_mask(out_f: int, in_f: int, density: float, seed: int = 0) -> torch.Tensor:
    """Exact-count uniform mask (Golubeva et al. 2021, §2.3), row 1 and column 2 forced empty (edge cases)."""
    g = torch.Generator().manual_seed(seed)
    k = round(density * out_f * in_f)
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    mask[torch.randperm(out_f * in_f, generator=g)[:k]] = True
    mask = mask.view(out_f, in_f)
    mask[1, :] = False
    mask[:, 2] = False
    return mask


def make_pair(out_f, in_f, density, dtype, bias=True, seed=0):
    """A CSRLinear and the (weight, mask, bias) of the equivalent masked dense layer."""
    g = torch.Generator().manual_seed(seed + 1)
    mask = random_mask(out_f, in_f, density, seed)
    weight = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    b = torch.randn(out_f, generator=g, dtype=dtype) if bias else None
    return CSRLinear.from_dense(weight, mask, b), weight, mask, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("batch_shape", [(6,), (3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_masked_dense(dtype, density, batch_shape, bias):
    layer, weight, mask, b = make_pair(23, 37, density, dtype, bias)
    x = torch.randn(*batch_shape, 37, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*batch_shape, 23)

    # Reference: the masked path, F.linear with W * M and autograd.
    w_ref = weight.clone().requires_grad_()
    b_ref = b.clone().requires_grad_() if bias else None
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref * mask, b_ref)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])
    torch.testing.assert_close(layer.values.grad, w_ref.grad[mask], **TOL[dtype])
    assert not w_ref.grad[~mask].any()  # what CSR does not even store is exactly zero in the reference
    if bias:
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, **TOL[dtype])


def test_first_layer_input_without_grad_and_chained_layers():
    # An input that needs no gradient (a network's first layer) skips grad_x; the transposed output
    # view of one CSRLinear is a valid input to the next.
    l1, w1, m1, b1 = make_pair(30, 20, 0.2, torch.float64, seed=1)
    l2, w2, m2, b2 = make_pair(10, 30, 0.3, torch.float64, seed=2)
    x = torch.randn(8, 20, dtype=torch.float64)
    out = l2(torch.relu(l1(x)))
    ref = F.linear(torch.relu(F.linear(x, w1 * m1, b1)), w2 * m2, b2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert l1.values.grad is not None and l2.values.grad is not None


def test_frozen_values_still_give_input_gradients():
    layer, weight, mask, b = make_pair(6, 9, 0.5, torch.float64)
    layer.values.requires_grad_(False)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, (weight * mask).sum(0).expand(4, 9))
    assert layer.values.grad is None and layer.bias.grad is not None


def test_empty_layer_gives_the_bias():
    layer = CSRLinear.from_dense(torch.zeros(4, 5), bias=torch.arange(4.0))
    assert layer.nnz == 0 and layer.density == 0.0
    x = torch.randn(3, 5, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.arange(4.0).expand(3, 4))
    y.sum().backward()
    assert layer.values.grad.shape == (0,)
    torch.testing.assert_close(layer.bias.grad, torch.full((4,), 3.0))


def test_gradcheck_float64():
    layer, *_ = make_pair(5, 7, 0.5, torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    v = layer.values.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def f(x, v, b):
        return torch.func.functional_call(layer, {"values": v, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, v, b))


def test_from_dense_to_dense_round_trip_is_exact():
    layer, weight, mask, b = make_pair(9, 11, 0.4, torch.float32)
    w_back, m_back = layer.to_dense()
    assert torch.equal(m_back, mask)
    assert torch.equal(w_back, weight * mask)
    assert layer.nnz == int(mask.sum()) and layer.density == pytest.approx(mask.float().mean().item())
    # Without a mask the structure is the nonzeros of the weight...
    again = CSRLinear.from_dense(w_back)
    assert torch.equal(again.to_dense()[0], w_back) and again.nnz == layer.nnz
    # ...and with a mask a free weight that is exactly 0.0 stays in the structure (it is trainable).
    w0 = torch.zeros(2, 3)
    assert CSRLinear.from_dense(w0, torch.ones(2, 3, dtype=torch.bool)).nnz == 6
    assert layer.in_features == 11 and layer.out_features == 9


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="mask shape"):
        CSRLinear.from_dense(torch.randn(3, 4), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        CSRLinear.from_dense(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="bias shape"):
        CSRLinear.from_dense(torch.randn(3, 4), bias=torch.randn(4))


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd"])
def test_optimizer_steps_match_masked_dense_with_zeroed_grads(opt_name):
    make_opt = {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3),
    }[opt_name]
    layer, weight, mask, b = make_pair(12, 16, 0.25, torch.float64)
    w_ref = nn.Parameter(weight * mask)
    b_ref = nn.Parameter(b.clone())
    opt, opt_ref = make_opt(layer.parameters()), make_opt([w_ref, b_ref])
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        x = torch.randn(8, 16, generator=g, dtype=torch.float64)
        t = torch.randn(8, 12, generator=g, dtype=torch.float64)
        opt.zero_grad()
        F.mse_loss(layer(x), t).backward()
        opt.step()
        # The recipe of the wide & sparse paper's released code: zero masked grads, then step.
        opt_ref.zero_grad()
        F.mse_loss(F.linear(x, w_ref, b_ref), t).backward()
        w_ref.grad[~mask] = 0
        opt_ref.step()
    torch.testing.assert_close(layer.values.detach(), w_ref.detach()[mask], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.detach(), b_ref.detach(), rtol=1e-10, atol=1e-12)
    assert not w_ref.detach()[~mask].any()
    # Optimizer state is nnz-sized: the masked weights do not exist.
    assert all(s.numel() in (0, 1, layer.nnz) for s in opt.state[layer.values].values())


def test_state_dict_round_trip_also_across_structures():
    layer, *_ = make_pair(6, 8, 0.5, torch.float32, seed=3)
    other, *_ = make_pair(6, 8, 0.2, torch.float32, seed=4)  # another mask draw, another nnz
    sd = layer.state_dict()
    assert {"values", "bias", "crow_indices", "col_indices", "t_crow_indices", "t_col_indices",
            "t_perm"} <= set(sd)
    other.load_state_dict(sd)
    x = torch.randn(5, 8)
    torch.testing.assert_close(other(x), layer(x))
    assert other.nnz == layer.nnz
    for name, t in layer.state_dict().items():
        assert torch.equal(other.state_dict()[name], t), name
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), layer(x))


def test_counting_hooks():
    layer, _, mask, _ = make_pair(10, 20, 0.3, torch.float32)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(10, 3))
    assert is_counted_layer(layer) and CSRLinear.counted_weight
    assert layer.num_counted_weights() == 200
    assert layer.num_nonzero_weights() == int(mask.sum())
    assert count_weights(model) == 200 + 30
    assert count_nonzero_weights(model) == int(mask.sum()) + 30
    # values is the only weight-like parameter: the dense shape is never materialised.
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]


def test_use_sparse_path_threshold():
    assert 0.0 < CSR_DENSITY_THRESHOLD < 1.0
    assert use_sparse_path(0.01)
    assert use_sparse_path(CSR_DENSITY_THRESHOLD / 2, "cpu")
    assert not use_sparse_path(CSR_DENSITY_THRESHOLD)
    assert not use_sparse_path(0.9, torch.device("cpu"))
    # Not measured on CUDA: never chosen automatically there.
    assert not use_sparse_path(0.001, "cuda")
    assert not use_sparse_path(0.001, torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    # Never chosen automatically on CUDA (not measured there), but it must work when asked for.
    layer, *_ = make_pair(40, 30, 0.2, torch.float32)
    gpu = copy.deepcopy(layer).cuda()
    x = torch.randn(7, 30)
    x_gpu = x.cuda().requires_grad_()
    x.requires_grad_()
    y, y_gpu = layer(x), gpu(x_gpu)
    g = torch.randn_like(y)
    y.backward(g)
    y_gpu.backward(g.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.values.grad.cpu(), layer.values.grad, rtol=1e-4, atol=1e-4)
