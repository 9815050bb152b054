"""Cost of the math core on the CPU: the frontier solver and the float64 Gram computation.

Two measurements (issue 12 §3), both at one thread by default:

1. ``solver``: :func:`frontier_trainer.geometry.solve_frontier_qp` on Gram matrices of m
   capability directions (m = 8 … 64) from three families (random, conflicting: the step
   lowers every capability, dependent: a third of the directions are combinations of the
   others), cold and warm started (a run of slowly changing steps, each warm started from
   the previous active set, as the projector does). The target is m = 64 in ≤ 10 ms.
2. ``gram``: one Gram row [⟨u, u⟩, ⟨u, c_1⟩, …] of :class:`UpdateProjector` on a parameter
   list shaped like SmolLM2-135M (tied 49152×576 embedding, 30 layers), float64 chunks, against
   the float32 accumulation the projector used before (``torch._foreach_norm`` for ‖u‖² and
   float32 product sums, reproduced in :func:`fp32_gram_row` as the baseline), with their
   relative errors against a float64 reference.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/solver_benchmark.py [--skip-gram]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from frontier_trainer import geometry, projection
from frontier_trainer.projection import UpdateProjector

logger = logging.getLogger("solver_benchmark")


def frontier_gram(kind: str, m: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Gram matrix of [u, c_1..c_m] for one family of problems (see the module docstring)."""
    u = rng.normal(size=d)
    C = rng.normal(size=(d, m))
    if kind == "conflicting":
        C = C - np.outer(u, np.abs(C.T @ u) + 0.3 * np.linalg.norm(C, axis=0) * np.linalg.norm(u)) / (u @ u)
    elif kind == "dependent":
        k = m // 3
        C[:, :k] = C[:, k : 2 * k] @ rng.normal(size=(k, k)) * 0.5
        C = C - np.outer(u, np.abs(C.T @ u)) / (u @ u)
    W = np.concatenate([u[:, None], C], axis=1)
    return W.T @ W


def time_solver(m: int, kind: str, eps: float, problems: int, warm_steps: int, seed: int) -> dict[str, float]:
    """Cold and warm solve times (ms) and the mean active-set size for one configuration."""
    rng = np.random.default_rng(seed)
    d = max(4 * m, 64)
    tolerances = [eps] * m
    cold, warm, cold_cpu, warm_cpu, active, unconverged = [], [], [], [], [], 0
    for _ in range(problems):
        base = frontier_gram(kind, m, d, rng)
        gram = torch.tensor(base)
        start, cpu = time.perf_counter(), time.process_time()
        sol = geometry.solve_frontier_qp(gram, tolerances)
        cold.append(time.perf_counter() - start)
        cold_cpu.append(time.process_time() - cpu)
        active.append(len(sol.active))
        unconverged += not sol.converged
        # a run of steps whose u drifts slowly: warm start from the previous active set
        L = np.linalg.cholesky(base + 1e-9 * np.trace(base) * np.eye(m + 1))
        prev = sol.active
        for _ in range(warm_steps):
            W = L.T.copy()
            W[:, 0] += 0.05 * np.linalg.norm(W[:, 0]) * rng.normal(size=m + 1) / np.sqrt(m + 1)
            g = torch.tensor(W.T @ W)
            start, cpu = time.perf_counter(), time.process_time()
            sol = geometry.solve_frontier_qp(g, tolerances, warm_start=prev)
            warm.append(time.perf_counter() - start)
            warm_cpu.append(time.process_time() - cpu)
            unconverged += not sol.converged
            prev = sol.active
    nan = float("nan")
    return {
        "cold_median_ms": 1e3 * statistics.median(cold),
        "cold_cpu_median_ms": 1e3 * statistics.median(cold_cpu),
        "cold_cpu_max_ms": 1e3 * max(cold_cpu),
        "warm_median_ms": 1e3 * statistics.median(warm) if warm else nan,
        "warm_cpu_median_ms": 1e3 * statistics.median(warm_cpu) if warm else nan,
        "warm_cpu_max_ms": 1e3 * max(warm_cpu) if warm else nan,
        "mean_active": float(np.mean(active)),
        "unconverged": float(unconverged),
    }


def smollm2_shapes(layers: int = 30) -> list[tuple[int, ...]]:
    """Trainable parameter shapes of SmolLM2-135M (hidden 576, MLP 1536, 9 heads / 3 KV heads
    of 64, vocabulary 49152, tied embedding): 134.5M elements."""
    h, mlp, kv, vocab = 576, 1536, 192, 49152
    shapes: list[tuple[int, ...]] = [(vocab, h)]
    for _ in range(layers):
        shapes += [(h, h), (kv, h), (kv, h), (h, h), (mlp, h), (mlp, h), (h, mlp), (h,), (h,)]
    return [*shapes, (h,)]


@torch.no_grad()
def fp32_gram_row(params: list[torch.Tensor], snapshot: list[torch.Tensor], dirs: list[list[torch.Tensor]]) -> torch.Tensor:
    """The float32 accumulation the projector used before issue 12 (the baseline), bucketed as
    it was (:func:`frontier_trainer.projection._buckets`, 2**26 elements): ‖u‖² from
    ``torch._foreach_norm`` and ⟨u, c⟩ from float32 products summed in float32."""
    total = torch.zeros(1 + len(dirs), dtype=torch.float64)
    for idx in projection._buckets(params):
        us = torch._foreach_sub([params[k] for k in idx], [snapshot[k] for k in idx])
        values = list(torch._foreach_norm(us))
        for d in dirs:
            values += [prod.sum() for prod in torch._foreach_mul(us, [d[k] for k in idx])]
        table = torch.stack(values).double().view(1 + len(dirs), len(idx))
        table[0].square_()
        total += table.sum(dim=1)
    return total


def time_gram(directions: int, repeats: int, layers: int) -> dict[str, float]:
    """Seconds per Gram row, float64 chunks vs the float32 baseline, and their errors."""
    gen = torch.Generator().manual_seed(0)
    shapes = smollm2_shapes(layers)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, generator=gen)) for s in shapes]
    projector = UpdateProjector(params)
    dirs = [[1e-3 * torch.randn(s, generator=gen) for s in shapes] for _ in range(directions)]
    projector.set_directions(dirs)
    projector.before_step()
    with torch.no_grad():
        for p in params:
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
    snapshot = projector._snapshot
    assert snapshot is not None
    reference = torch.zeros(1 + directions, dtype=torch.float64)
    for k, p in enumerate(params):
        u = p.detach().double() - snapshot[k].double()
        reference[0] += (u * u).sum()
        for j, d in enumerate(dirs):
            reference[1 + j] += (u * d[k].double()).sum()
    scale = torch.cat([reference[:1], (reference[0] * projector._direction_gram.diagonal()).sqrt()])

    def run(fn) -> tuple[float, torch.Tensor]:
        fn()  # warm-up (allocations)
        times = []
        for _ in tqdm(range(repeats), desc=fn.__name__, leave=False):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    def float64_chunks() -> torch.Tensor:
        return projector._inner_products_with_update()

    def float32_baseline() -> torch.Tensor:
        return fp32_gram_row(params, snapshot, dirs)

    t64, row64 = run(float64_chunks)
    t32, row32 = run(float32_baseline)
    return {
        "elements": float(sum(p.numel() for p in params)),
        "float64_s": t64,
        "float32_s": t32,
        "ratio": t64 / t32,
        "float64_err": float(((row64 - reference).abs() / scale).max()),
        "float32_err": float(((row32 - reference).abs() / scale).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--warm-steps", type=int, default=10)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-gram", action="store_true")
    parser.add_argument("--gram-directions", type=int, default=2)
    parser.add_argument("--gram-repeats", type=int, default=5)
    parser.add_argument("--gram-layers", type=int, default=30, help="30 = SmolLM2-135M")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    rows = []
    for m in args.sizes:
        for kind in ("random", "conflicting", "dependent"):
            for eps in args.eps:
                logger.info("solver m=%d %s eps=%g", m, kind, eps)
                rows.append((m, kind, eps, time_solver(m, kind, eps, args.problems, args.warm_steps, seed=m)))
    print(
        f"frontier solver, {args.threads} thread(s), {args.problems} problems x {args.warm_steps} warm steps; "
        "wall = median wall-clock ms, cpu = process CPU ms (median / max; wall maxima on a shared host "
        "are scheduling noise)"
    )
    head = ["m", "kind", "eps", "cold wall", "cold cpu", "cold cpu max", "warm wall", "warm cpu", "warm cpu max", "|A|", "fallback"]
    print(f"{head[0]:>4} {head[1]:<12} {head[2]:>5} " + " ".join(f"{h:>12}" for h in head[3:]))
    for m, kind, eps, r in rows:
        cells = [
            r["cold_median_ms"], r["cold_cpu_median_ms"], r["cold_cpu_max_ms"],
            r["warm_median_ms"], r["warm_cpu_median_ms"], r["warm_cpu_max_ms"],
        ]
        print(
            f"{m:>4} {kind:<12} {eps:>5.2f} " + " ".join(f"{c:>10.2f}ms" for c in cells)
            + f" {r['mean_active']:>12.1f} {int(r['unconverged']):>12d}"
        )
    if not args.skip_gram:
        r = time_gram(args.gram_directions, args.gram_repeats, args.gram_layers)
        print(
            f"\nGram row on a SmolLM2-shaped parameter list ({r['elements'] / 1e6:.1f}M elements, "
            f"{args.gram_directions} directions, {args.threads} thread(s), median of {args.gram_repeats}):"
        )
        print(f"  float64 chunks   {r['float64_s'] * 1e3:8.1f} ms   max rel. error {r['float64_err']:.1e}")
        print(f"  float32 baseline {r['float32_s'] * 1e3:8.1f} ms   max rel. error {r['float32_err']:.1e}")
        print(f"  cost ratio float64/float32: {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
