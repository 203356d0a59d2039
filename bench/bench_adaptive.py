"""Bench: one training step of an adaptive-width MLP vs a fixed MLP of the same width (Errica et al. 2025).

The comparison is the method's own cost, at equal width, loss and optimizer:

* fixed step: a plain MLP (``models.mlp.MLP``, ReLU6) at the adaptive net's width, cross-entropy plus
  the Gaussian weight prior sum theta^2 / (2 sigma_theta^2 N) (``ElboPrior.theta_term``: the loss minus
  its adaptive-only terms), Adam as the trainer builds it (``train.optim.build_optimizer``: torch's
  fused kernel on the CPU); ``--adam loop`` times both steps with torch's per-tensor CPU loop instead;
* adaptive step: the same plus everything the method adds: the rescaling by p (forward and backward,
  including dL/dr), r in Adam, and the callback's per-step width check against cached thresholds (one
  read of r, which on the CPU is a plain memory read). On the CPU the rescaling runs in the compiled
  kernel (``methods/adaptive/cpu_kernel``, built on first use; the bench fails if it cannot be built),
  and the same step is also timed on the PyTorch path (kernel switched off) for comparison.

r is set to r0 +- 1e-6 after every adaptive step, alternately, so that p is recomputed every step as in
training (Adam moves r at every optimizer step) while the width stays where it is (the steady state; the
cost of a resize is measured separately: the last table). The reset writes r's memory through a numpy
view: it stands in for Adam's own move of r and would otherwise add two tensor operations that no
training step has. A breakdown table times the
adaptive step (kernel path) with its parts added one at a time, on the smallest network.

Denormal floats are flushed to zero for the whole bench (``torch.set_flush_denormal``): after ~1,500
steps of the fixed network on its random labels some of its values underflow into the denormal range,
where the CPU's arithmetic is slow, and its step became ~25% slower (1.00 -> 1.25 ms in one run, while
the adaptive step stayed at 1.23 ms): a ratio measured late in the bench then read ~1.03 instead of
~1.26. Flushed, both steps keep their cost however long they run.

Both steps are timed round-robin in one process (bench/_timing.py), so a busy spell on a shared machine
hits both alike; per round the ratio adaptive / fixed is taken, and the table gives the median of those
ratios and their inter-quartile range. On one CPU thread the same is repeated on the thread's CPU clock,
which leaves out the time the process spends descheduled.

    nice -n 5 .venv/bin/python bench/bench_adaptive.py --threads 1 --rounds 41
                                                        # writes bench/results/adaptive-cpu.md

Target (issue 6): ratio <= 1.2 (the adaptive step as widthlab runs it: on the CPU, the kernel path).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import markdown_table, time_interleaved  # noqa: E402
from widthlab.methods.adaptive import cpu_kernel  # noqa: E402
from widthlab.methods.adaptive.callback import AdaptiveWidthCallback  # noqa: E402
from widthlab.methods.adaptive.layer import collect_sites  # noqa: E402
from widthlab.methods.adaptive.loss import ElboPrior  # noqa: E402
from widthlab.methods.adaptive.mlp import adaptive_mlp  # noqa: E402
from widthlab.methods.adaptive.resizing import set_width  # noqa: E402
from widthlab.models.mlp import MLP, MLPConfig  # noqa: E402
from widthlab.nn.optim_surgery import remap_optimizer  # noqa: E402
from widthlab.train.config import OptimConfig  # noqa: E402
from widthlab.train.optim import build_optimizer  # noqa: E402

SIGMA_THETA, N_OBS = 1.0, 1000


def make_adam(params, adam: str = "trainer") -> torch.optim.Optimizer:
    """Adam at lr 1e-3 as the trainer builds it, or (``"loop"``) with torch's per-tensor CPU loop."""
    params = list(params)
    if adam == "loop":
        return torch.optim.Adam(params, lr=1e-3, foreach=False, fused=False)
    return build_optimizer(params, OptimConfig(name="adam", lr=1e-3))


class _Trainer:
    """The attributes of the trainer that the callback reads."""

    def __init__(self, model):
        self.model = model


def adaptive_step(d_in: int, n_out: int, lam0: float, hidden_layers: int, x, y, device: str, *,
                  new_r: bool = True, grad_r: bool = True, adam_r: bool = True, check: bool = True,
                  adam: str = "trainer", kernel: bool = True):
    """One adaptive training step, with switches that drop the method's parts one by one (breakdown).

    Args:
        new_r: give r a new value after every step (p is recomputed, as in training, where r moves
            every step); False keeps r, so p comes from the cache.
        grad_r: r requires grad (dL/dr through p); False: p is a constant.
        adam_r: r is in Adam (its update; the value is reset by ``new_r`` after the step).
        check: the callback's per-step width check.
        adam: ``"trainer"`` or ``"loop"`` (``make_adam``).
        kernel: False runs the step on the PyTorch path (``cpu_kernel.disabled``) instead of the
            compiled CPU kernel (no difference on a GPU, where the kernel is never used).

    Returns:
        (step function, adaptive model, its optimizer).
    """
    torch.manual_seed(0)
    ada = adaptive_mlp(d_in, n_out, lam0=lam0, hidden_layers=hidden_layers).to(device)
    dists = [s.scale.dist for s in collect_sites(ada)]
    for d in dists:
        d.r.requires_grad_(grad_r)
    params = [p for n, p in ada.named_parameters() if adam_r or not n.endswith("dist.r")]
    opt = make_adam(params, adam)
    cb = AdaptiveWidthCallback(ElboPrior(sigma_theta=SIGMA_THETA, n_observations=N_OBS), seed=0)
    tr = _Trainer(ada)
    r0 = [float(d.r.detach()) for d in dists]
    # Host views of r (CPU) for a reset without tensor operations; on a GPU a copy_ (one small kernel).
    views = [d.r.detach().numpy() if d.r.device.type == "cpu" else None for d in dists]
    parity = [0]

    def step():
        with contextlib.nullcontext() if kernel else cpu_kernel.disabled():
            out = ada(x)
            loss = F.cross_entropy(out, y) + cb.extra_loss(ada, out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        parity[0] ^= new_r
        for d, v, r in zip(dists, views, r0):  # r inside the same width: the steady state, no resizes
            if v is not None:
                v[...] = r + 1e-6 * parity[0]
            else:
                with torch.no_grad():
                    d.r.fill_(r + 1e-6 * parity[0])
        if check:
            assert not cb.on_step_end(tr)

    return step, ada, opt


def steps(d_in: int, n_out: int, lam0: float, batch: int, hidden_layers: int, device: str,
          breakdown: bool = False, adam: str = "trainer"):
    """Step functions: fixed with the weight prior, fixed with CE only, adaptive (compiled kernel on
    the CPU), adaptive on the PyTorch path, and with ``breakdown`` the adaptive step without some of
    its parts (``adaptive_step``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g).to(device)
    y = torch.randint(0, n_out, (batch,), generator=g).to(device)
    step_adaptive, ada, opt_a = adaptive_step(d_in, n_out, lam0, hidden_layers, x, y, device, adam=adam)
    step_pytorch = adaptive_step(d_in, n_out, lam0, hidden_layers, x, y, device, adam=adam, kernel=False)[0]
    widths = tuple(ada.widths().values())
    fixed = MLP(MLPConfig(d_in, n_out, widths=widths, activation="relu6")).to(device)
    fixed_ce = MLP(MLPConfig(d_in, n_out, widths=widths, activation="relu6")).to(device)
    opt_f, opt_c = (make_adam(m.parameters(), adam) for m in (fixed, fixed_ce))
    weight_prior = ElboPrior(sigma_theta=SIGMA_THETA, n_observations=N_OBS)  # no lam prior: flat

    def step_fixed():
        out = fixed(x)
        loss = F.cross_entropy(out, y) + weight_prior(fixed)
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        opt_f.step()

    def step_fixed_ce():
        out = fixed_ce(x)
        loss = F.cross_entropy(out, y)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    fns = {"fixed": step_fixed, "fixed_ce": step_fixed_ce, "adaptive": step_adaptive,
           "adaptive_pytorch": step_pytorch}
    if breakdown:
        args = (d_in, n_out, lam0, hidden_layers, x, y, device)
        for name, kw in BREAKDOWN.items():
            fns[name] = adaptive_step(*args, **kw, adam=adam)[0]
    return widths, fns, (ada, opt_a)


REMAINING = """\
What the adaptive step adds is per-step work of the method itself, a fixed amount per adaptive layer,
which on networks this small (a fixed step is ~160 aten operations of a few microseconds each) shows
as a tenth to a fifth, and on the MNIST-sized net as a few percent. On the CPU the rescaling is one
compiled autograd node per layer (methods/adaptive/cpu_kernel.cpp): forward, p and dp/dr from r's
closed form in C++ and one product (of the next layer's weight by columns, W diag(p), when that is
smaller than the batch x D activations, else of the activations); backward, g p and
dL/dr = sum_j dp_j/dr sum_b g t in one pass. Then r as one more tensor in Adam (about five operations
per tensor even in the fused CPU kernel, about ten with `--adam loop`), and the width check (one read
of r, compared with cached thresholds on the host).
The PyTorch path (no compiler, or WIDTHLAB_CPU_KERNEL=off) builds the same function from PyTorch
operations: p and dp/dr in numpy from r's host value, two graph nodes linearising p around it
(p + dp/dr (r - r_value)) and the product: five graph nodes and a dozen host operations per layer,
~1.25-1.35x a fixed step on the 2-D nets. Tried there and dropped: a Python autograd.Function for the
folded product (its call overhead ate the saved nodes), folding every layer, a reused p buffer (a graph
built at an earlier r would see overwritten values)."""

RESIZES = """\
The steady-state steps above change no width. How often a step resizes depends on the run: one unit
of width is a change of lam of about lam^2 / 2.3, so at the small rates of the SpiralHard studies
(lam ~ 0.003, Adam lr 0.01-0.05) most steps cross a threshold (adaptive-compression-spiralhard: about
52,000 resizes in 57,000 steps), and a training step then also pays one resize (most of it the core
width surgery, nn/surgery.resize_site, and its checks) plus the exact width check."""

# Cumulative parts of the adaptive step (each row adds one part to the row above; the last row adds the
# width check and is the full adaptive step).
BREAKDOWN = {
    "rescaling by p, recomputed as r moves": dict(grad_r=False, adam_r=False, check=False),
    "+ dL/dr through p": dict(adam_r=False, check=False),
    "+ r in Adam": dict(check=False),
}


def time_interleaved_cpu(fns: dict[str, Callable[[], object]], rounds: int, inner: int = 20,
                         warmup: int = 3) -> dict[str, list[float]]:
    """Like ``_timing.time_interleaved`` (round-robin, rotating order) but on the thread's CPU clock.

    With one torch thread all of a step's work runs on the calling thread, so ``time.thread_time``
    counts only that work: time the thread spends descheduled by other processes on a shared machine
    (the main noise of wall-clock medians there) is left out.
    """
    names = list(fns)
    for n in names:
        for _ in range(warmup):
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.thread_time()
            for _ in range(inner):
                fns[n]()
            samples[n].append((time.thread_time() - t0) / inner)
    return samples


def ratio_stats(num: list[float] | tuple[float, ...], den: list[float] | tuple[float, ...]):
    """Median and inter-quartile range of the per-round ratios num[i] / den[i]."""
    ratios = [a / b for a, b in zip(num, den)]
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    return med, f"{q1:.2f}-{q3:.2f}"


def resize_cost(ada, opt, rounds: int) -> float:
    """Seconds for one resize event of the first site (+1 unit, then -1), with the optimizer surgery."""
    site = collect_sites(ada)[0]
    g = torch.Generator().manual_seed(0)
    D = site.width
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for target in (D + 1, D):
            ev = set_width(site, target, model=ada, generator=g, optimizer_mode="reset")
            remap_optimizer(opt, ev, mode="reset")
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adam", choices=("trainer", "loop"), default="trainer",
                    help="Adam as the trainer builds it (fused on the CPU) or torch's per-tensor loop")
    ap.add_argument("--out", default=None,
                    help="default: bench/results/adaptive-<device>[-loop].md")
    args = ap.parse_args()
    suffix = "-loop" if args.adam == "loop" else ""
    args.out = args.out or str(Path(__file__).resolve().parent / "results"
                               / f"adaptive-{args.device.split(':')[0]}{suffix}.md")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # see the module docstring: no step-count-dependent slowdown
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    configs = [
        # (label, d_in, outputs, lam0, batch, hidden layers)
        ("Spiral/SpiralHard-sized, 2 -> D -> 2", 2, 2, 0.01, 128, 1),
        ("Spiral 2-layer, 2 -> D -> D -> 2", 2, 2, 0.01, 128, 2),
        ("MNIST-sized, 784 -> D -> 10", 784, 10, 0.01, 128, 1),
    ]
    rows, resize_rows = [], []
    on_cpu = args.device == "cpu"
    cpu_clock = on_cpu and args.threads == 1
    if on_cpu:
        cpu_kernel.load(strict=True)  # the adaptive steps must time the kernel, not silently fall back
    breakdown_rows: list[list[object]] = []
    for k, (label, d_in, n_out, lam0, batch, layers) in enumerate(configs):
        widths, fns, (ada, opt) = steps(d_in, n_out, lam0, batch, layers, args.device, breakdown=k == 0,
                                        adam=args.adam)
        if k == 0:  # where the cost goes, on the smallest network (all parts timed in one interleaved loop)
            parts = ["fixed", *BREAKDOWN, "adaptive"]
            bd = {n: list(v.samples) for n, v in
                  time_interleaved({n: fns[n] for n in parts}, rounds=args.rounds, sync=sync).items()} \
                if not cpu_clock else time_interleaved_cpu({n: fns[n] for n in parts}, rounds=args.rounds)
            prev = 1.0
            for n in parts[1:]:
                med, iqr = ratio_stats(bd[n], bd["fixed"])
                breakdown_rows.append([n if n != "adaptive" else "+ width check (= adaptive step)", med, iqr,
                                       med - prev])
                prev = med
            fns = {n: fns[n] for n in ("fixed", "fixed_ce", "adaptive", "adaptive_pytorch")}
        if not on_cpu:  # the kernel is CPU-only: on a GPU both adaptive steps are the same code
            del fns["adaptive_pytorch"]
        t = time_interleaved(fns, rounds=args.rounds, sync=sync)
        med, iqr = ratio_stats(t["adaptive"].samples, t["fixed"].samples)
        med_ce, _ = ratio_stats(t["adaptive"].samples, t["fixed_ce"].samples)
        row = [label, "/".join(map(str, widths)), t["fixed"].ms, t["adaptive"].ms, med, iqr, med_ce]
        if on_cpu:
            pt_med, pt_iqr = ratio_stats(t["adaptive_pytorch"].samples, t["fixed"].samples)
            row += [f"{pt_med:.2f} ({pt_iqr})"]
        if cpu_clock:
            c = time_interleaved_cpu({n: fns[n] for n in ("fixed", "adaptive")}, rounds=args.rounds)
            cmed, ciqr = ratio_stats(c["adaptive"], c["fixed"])
            row += [1e3 * statistics.median(c["fixed"]), 1e3 * statistics.median(c["adaptive"]), cmed, ciqr]
        rows.append(row)
        print(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row), flush=True)
        rc = resize_cost(ada, opt, rounds=max(5, args.rounds // 3))
        resize_rows.append([label, 1e3 * rc, rc / t["adaptive"].median])
    header = ["config (batch 128)", "width D", "fixed step (ms, wall)", "adaptive step (ms, wall)",
              "ratio (wall, median)", "ratio IQR (wall)", "ratio vs CE-only fixed (wall)"]
    if on_cpu:
        header += ["ratio, PyTorch path (wall, median and IQR)"]
    if cpu_clock:
        header += ["fixed (ms, thread CPU)", "adaptive (ms, thread CPU)", "ratio (thread CPU, median)",
                   "ratio IQR (thread CPU)"]
    table = markdown_table(header, rows)
    resize_table = markdown_table(["config", "one resize + optimizer surgery (ms)", "in adaptive steps"],
                                  resize_rows)
    clock = "thread CPU" if cpu_clock else "wall"
    breakdown_table = markdown_table(["adaptive step, cumulative parts", f"ratio to fixed ({clock}, median)",
                                      "IQR", "increment"], breakdown_rows)
    text = (f"# Adaptive-width MLP step vs fixed MLP step ({args.device})\n\n"
            f"`nice -n 5 .venv/bin/python bench/bench_adaptive.py --device {args.device} --threads "
            f"{args.threads} --rounds {args.rounds} --adam {args.adam}`; torch {torch.__version__}, "
            f"{platform.processor() or platform.machine()}, {args.threads} thread(s), {args.rounds} "
            f"interleaved rounds.\n\n{table}\n\n"
            "Fixed step: plain MLP at the same width, ReLU6, cross-entropy + the Gaussian weight prior "
            f"(sigma_theta = {SIGMA_THETA}, N = {N_OBS}), Adam (the loss minus its adaptive-only terms). "
            "Adaptive step: the same plus the rescaling by p (forward and backward, dL/dr), r in Adam and "
            "the callback's per-step width check against cached thresholds; on the CPU the rescaling runs "
            "in the compiled kernel (methods/adaptive/cpu_kernel.cpp), and the `PyTorch path` column "
            "times the same step with the kernel switched off (cpu_kernel.disabled). Ratios are medians of "
            "the per-round ratios (both steps timed in the same round, bench/_timing.py), with their "
            "inter-quartile range; `ratio vs CE-only fixed` compares with a fixed MLP trained without "
            "the weight prior. Target: ratio <= 1.2. Denormals are flushed to zero (the fixed step "
            "otherwise slows by ~25% after ~1,500 steps; see the bench's docstring). Thread-CPU columns "
            "repeat the interleaved timing "
            "on time.thread_time (one torch thread), which leaves out time spent descheduled on a "
            "shared, loaded machine.\n\n"
            f"Where the cost goes ({configs[0][0]}; each row adds one part of the method):\n\n"
            f"{breakdown_table}\n\n{REMAINING}\n\n"
            f"Resize events:\n\n{resize_table}\n\n{RESIZES}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
