"""Benchmark the JAX L0 fit against l0-python 0.6.2 (torch, CPU) on the same problem.

    python benchmarks/bench_fit.py --epochs 50                  # synthetic seed-shaped problem
    python benchmarks/bench_fit.py --matrix X.npz --targets y.npy [--groups g.npy] [--init w.npy]
    python benchmarks/bench_fit.py --gpu-report [--bandwidth-gbs 3350]
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/bench_fit.py --shard   # sharded fit
    python benchmarks/dump_fit_problem.py /tmp/allcd.npz geo=all     # a run's fit problem (all 436 CDs) ...
    python benchmarks/bench_fit.py --problem /tmp/allcd.npz --interleave 5 --layout-cache /tmp/layouts  # ... timed

Every mode prints the epoch time as a multiple of the memory-bandwidth bound: the bytes an
epoch must move (``bytes_per_epoch``) over the streaming bandwidth measured in the same run
(``stream_bandwidth``, or ``--bandwidth-gbs``). ``--interleave N`` runs N rounds of (bandwidth, the
sparse kernel's fit, the ``auto`` kernel's fit) and prints each round's ratios and their medians.

Same hyperparameters, initial weights and epochs for both fits, and the same objective:
l0-python sums group-normalised squared errors, so it is given group multipliers 1/G
(one group of all targets when not balancing), which makes its data term this fit's
mean (Adam's eps is not scale invariant, so the scale must match, not just be
proportional). Final losses of both are recomputed here by one numpy function. Needs only jax/numpy/scipy; the
l0-python column is skipped (with a note) when l0/torch are not importable.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `calibrate`

from synthetic import SyntheticSpec, make_problem  # noqa: E402

from calibrate.fit import FitConfig, fit_l0  # noqa: E402
from calibrate.fit.model import target_loss_weights  # noqa: E402
from calibrate.matrix.layout import StackedLayout  # noqa: E402


def load_problem(args) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray | None, np.ndarray, str, np.ndarray | None]:
    """(X, targets, groups, init weights, label, column groups) from files or the synthetic generator."""
    if args.problem:
        with np.load(args.problem, allow_pickle=False) as d:
            X = sp.csr_matrix((d["data"], d["indices"], d["indptr"]), shape=tuple(d["shape"]))
            args.loss_weights, args.tolerances = d["loss_weights"], d["tolerances"]
            return X, d["targets"], None, d["init"], f"problem {args.problem}", d["column_groups"]
    if args.matrix:
        X = sp.load_npz(args.matrix).tocsr()
        targets = np.load(args.targets)
        groups = np.load(args.groups) if args.groups else None
        init = np.load(args.init) if args.init else np.ones(X.shape[1])
        if not args.init:
            print("note: no --init given, starting from weights 1.0 (l0-python's default)")
        return X, targets, groups, init, f"matrix {args.matrix}", None
    p = make_problem(SyntheticSpec(seed=args.seed))
    rank = np.array([np.sum(p.cd_state[:i] == s) for i, s in enumerate(p.cd_state)]) + 1  # CD number in its state
    layout = StackedLayout.of(np.asarray(p.cd_state) * 100 + rank, np.arange(len(p.base_weights)), p.base_weights,
                              p.household_state)
    init = layout.initial_weights()
    return p.X, p.targets, p.groups, init, "synthetic seed-shaped problem", layout.column_groups()


def data_loss(X, targets, loss_weights, weights) -> float:
    """Sum_i loss_weight_i * ((X w - y)_i / (y_i + 1))^2 in float64 (the fit's data term)."""
    rel = (X @ np.asarray(weights, np.float64) - targets) / (targets + 1.0)
    return float(np.sum(loss_weights * rel**2))


def objective(X, targets, loss_weights, log_weight, log_alpha, cfg: FitConfig) -> float:
    """Full objective with deterministic gates, numpy float64 (for l0-python's parameters)."""
    la = np.clip(log_alpha, -20, 20)
    gate = np.clip(1 / (1 + np.exp(-la / cfg.beta)) * (cfg.zeta - cfg.gamma) + cfg.gamma, 0, 1)
    p_open = 1 / (1 + np.exp(-(la - cfg.beta * np.log(-cfg.gamma / cfg.zeta))))
    pos = np.exp(log_weight)
    return (data_loss(X, targets, loss_weights, pos * gate)
            + cfg.lambda_l0 * p_open.sum() + cfg.lambda_l2 * np.sum(pos**2))


def run_l0python(X, targets, groups, init, cfg: FitConfig, loss_weights):
    """(seconds/epoch, objective, data loss, setup seconds) of l0-python, or None if missing."""
    try:
        import torch
        from l0 import SparseCalibrationWeights
    except ImportError as exc:
        print(f"l0-python column skipped: {exc}")
        return None
    torch.manual_seed(cfg.seed)
    # l0-python's data loss is sum_i e_i^2 / n_group(i); multipliers 1/G make it our mean
    groups = groups if (groups is not None and cfg.balance_groups) else np.zeros(X.shape[0], np.int64)
    unique = np.unique(groups)
    multipliers = {int(g): 1.0 / unique.size for g in unique}
    model = SparseCalibrationWeights(
        X.shape[1], beta=cfg.beta, gamma=cfg.gamma, zeta=cfg.zeta, init_keep_prob=cfg.init_keep_prob,
        init_weights=init, log_weight_jitter_sd=cfg.jitter, log_alpha_jitter_sd=cfg.jitter, seed=cfg.seed,
    )
    t0 = time.perf_counter()
    model._convert_sparse_to_torch(X)  # cached conversion: keep it out of the per-epoch time
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit(X, targets, lambda_l0=cfg.lambda_l0, lambda_l2=cfg.lambda_l2, lr=cfg.lr, epochs=cfg.epochs,
              loss_type="relative", target_groups=groups, normalize_groups=True, group_multipliers=multipliers)
    per_epoch = (time.perf_counter() - t0) / cfg.epochs
    with torch.no_grad():
        weights = model.get_weights(deterministic=True).numpy()
        obj = objective(X, targets, loss_weights, model.log_weight.numpy().astype(np.float64),
                        model.log_alpha.numpy().astype(np.float64), cfg)
    return per_epoch, obj, data_loss(X, targets, loss_weights, weights), setup


PRODUCTS_PER_EPOCH = 2  # the forward X w and the backward X^T g of one training step


def bytes_per_epoch(X: sp.csr_matrix) -> tuple[int, str]:
    """Lower bound of bytes one epoch must move, and its formula."""
    n, nnz = X.shape[1], X.nnz
    n_active = int(np.count_nonzero(np.diff(X.tocsc().indptr)))
    total = 8 * nnz * PRODUCTS_PER_EPOCH + 48 * n + 20 * n_active
    return total, (f"8 B/nonzero (4 value + 4 index) x {PRODUCTS_PER_EPOCH} products + 48 B/column (read+write "
                   "log_w, log_alpha, Adam m, v) + 20 B/active column (noise id, w, grad w)")


def stream_bandwidth(n_bytes: int = 1 << 30, repeats: int = 7) -> float:
    """Streaming read bandwidth (bytes/s) of the default JAX device: the best of ``repeats`` runs of two
    reads of one float32 array of ``n_bytes``, a sum and a matrix-vector product with ones (the kernel of
    the dense products; on CPU it may use both cores where the sum uses one), measured in this run,
    under this run's load."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones(n_bytes // 4, jnp.float32)
    reads = (jax.jit(jnp.sum), jax.jit(lambda x: jnp.dot(x.reshape(-1, 4096), jnp.ones(4096, x.dtype),
                                                          precision=jax.lax.Precision.HIGHEST)))
    best = float("inf")
    for read in reads:
        jax.block_until_ready(read(a))
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(read(a))
            best = min(best, time.perf_counter() - t0)
    del a
    return n_bytes / best


def print_bound(X: sp.csr_matrix, seconds_per_epoch: float, bandwidth: float | None = None) -> None:
    """The epoch's bytes, the bandwidth (measured now unless given) and the epoch time as a multiple of the bound."""
    nbytes, formula = bytes_per_epoch(X)
    measured = bandwidth is None
    bandwidth = stream_bandwidth() if bandwidth is None else bandwidth
    bound = nbytes / bandwidth
    print(f"bytes per epoch               {nbytes / 1e6:.1f} MB  [{formula}]")
    print(f"memory bandwidth              {bandwidth / 1e9:.1f} GB/s "
          f"({'measured in this run: best sum of a 1 GiB float32 array' if measured else 'given'})")
    print(f"bandwidth bound/epoch         {bound * 1e3:.3f} ms")
    print(f"epoch time / bound            {seconds_per_epoch / bound:.2f}x")


def gpu_report(X, targets, groups, init, cfg: FitConfig, bandwidth_gbs: float | None) -> None:
    """Seconds/epoch, total for cfg.epochs incl. compilation, and the memory-bandwidth ratio.

    JAX's backend start-up (CUDA context) is timed apart: a pipeline pays it once per
    process, before the fit. The fit is run twice: cold (compiles) and warm (cached).
    """
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(jax.device_put(np.zeros(1)) + 1)
    backend = time.perf_counter() - t0
    cold = fit_l0(X, targets, init, cfg, groups, progress=False)
    warm = fit_l0(X, targets, init, cfg, groups, progress=False)
    assert np.array_equal(cold.weights, warm.weights), "same seed must give identical weights"
    print(f"device                        {cold.device}")
    print(f"backend start-up seconds      {backend:.2f} (once per process, not in the fit)")
    print(f"epochs                        {cold.epochs}")
    print(f"seconds/epoch (excl. compile) {cold.seconds_per_epoch:.6f} (warm run {warm.seconds_per_epoch:.6f})")
    print(f"compile seconds               {cold.compile_seconds:.2f}")
    print(f"total seconds incl. compile   {cold.total_seconds:.2f} (warm run, cached programs: {warm.total_seconds:.2f})")
    print(f"  of which training epochs    {cold.seconds_per_epoch * cold.epochs:.2f}")
    print(f"final loss / sparsity         {cold.final_loss:.6g} / {cold.sparsity:.4f}")
    print(f"setup seconds (before epoch 1) {cold.setup_seconds:.2f} (warm run {warm.setup_seconds:.2f})")
    print_bound(X, warm.seconds_per_epoch, None if bandwidth_gbs is None else bandwidth_gbs * 1e9)


def shard_report(X, targets, groups, init, column_groups, cfg: FitConfig) -> None:
    """The sharded fit (``shard=auto``, columns split by column group) against ``shard=off`` in the same
    run: epoch time as a ratio, and how far the weights are apart (same gates, other sum order)."""
    import jax

    single = fit_l0(X, targets, init, cfg, groups, progress=False, column_groups=column_groups)
    sharded = fit_l0(X, targets, init, replace(cfg, shard="auto"), groups, progress=False,
                     column_groups=column_groups)
    gap = np.abs(sharded.weights - single.weights)
    print(f"devices JAX sees              {len(jax.devices())} ({sharded.n_devices} used by shard=auto)")
    print(f"column groups                 {1 if column_groups is None else np.unique(column_groups).size}")
    print(f"s/epoch shard=off / auto      {single.seconds_per_epoch:.4f} / {sharded.seconds_per_epoch:.4f} "
          f"(ratio auto/off {sharded.seconds_per_epoch / single.seconds_per_epoch:.2f})")
    print(f"setup seconds off / auto      {single.setup_seconds:.2f} / {sharded.setup_seconds:.2f}")
    print(f"max |w_auto - w_off| / max w  {gap.max() / max(single.weights.max(), 1e-30):.2e}; "
          f"same zero weights: {np.array_equal(sharded.weights == 0, single.weights == 0)}")
    print(f"final loss off / auto         {single.final_loss:.6g} / {sharded.final_loss:.6g}")


def kernel_bytes(path: Path) -> int:
    """Bytes the dense-block products read per epoch, from a cached blocks layout (both products read the
    own and shared blocks once each)."""
    from calibrate.fit.aligned import map_arrays

    _, arrays = map_arrays(path)
    return 2 * (arrays["values"].nbytes + arrays["shared_values"].nbytes)


def interleaved(X, targets, groups, init, column_groups, cfg: FitConfig, rounds: int, layout_cache: str | None,
                loss_weights=None, tolerances=None) -> None:
    """``rounds`` rounds of (same-run bandwidth, fit with kernel=sparse, fit with kernel=auto): s/epoch and the
    multiple of the bound per round, then the medians (one process; the first round also compiles)."""
    nbytes, formula = bytes_per_epoch(X)
    print(f"bytes per epoch (the bound)   {nbytes / 1e6:.1f} MB  [{formula}]")
    extra = {"loss_weights": loss_weights, "tolerances": tolerances} if loss_weights is not None else {"groups": groups}
    rows = []
    for r in range(rounds):
        bandwidth = stream_bandwidth()
        row = {"bandwidth": bandwidth}
        for kernel in ("sparse", "auto"):
            cache = None if layout_cache is None else Path(layout_cache) / f"layout-{kernel}.safetensors"
            res = fit_l0(X, targets, init, replace(cfg, kernel=kernel), progress=False, column_groups=column_groups,
                         layout_cache=cache, **extra)
            row[kernel] = (res.seconds_per_epoch, res.setup_seconds, res.kernel)
        rows.append(row)
        bound = nbytes / bandwidth
        print(f"round {r}: bandwidth {bandwidth / 1e9:5.1f} GB/s, bound {bound * 1e3:6.1f} ms | "
              + " | ".join(f"{k} ({v[2]}) {v[0] * 1e3:6.1f} ms/epoch = {v[0] / bound:4.2f}x, setup {v[1]:.2f} s"
                           for k, v in row.items() if k != "bandwidth"), flush=True)
    ratio = {k: float(np.median([row[k][0] * row["bandwidth"] / nbytes for row in rows])) for k in ("sparse", "auto")}
    epoch = {k: float(np.median([row[k][0] for row in rows])) for k in ("sparse", "auto")}
    print(f"median over {rounds} rounds: sparse {epoch['sparse'] * 1e3:.1f} ms/epoch = {ratio['sparse']:.2f}x the "
          f"bound; auto ({rows[-1]['auto'][2]}) {epoch['auto'] * 1e3:.1f} ms/epoch = {ratio['auto']:.2f}x; "
          f"bandwidth median {np.median([row['bandwidth'] for row in rows]) / 1e9:.1f} GB/s")
    if rows[-1]["auto"][2] == "blocks" and layout_cache is not None:
        moved = kernel_bytes(Path(layout_cache) / "layout-auto.safetensors") + nbytes - 16 * X.nnz
        print(f"bytes the blocks kernel reads {moved / 1e6:.1f} MB per epoch (dense blocks both ways + the columns): "
              f"median {float(np.median([row['auto'][0] * row['bandwidth'] / moved for row in rows])):.2f}x that")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=50, help="epochs for the comparison (default 50)")
    ap.add_argument("--matrix", help="scipy.sparse .npz of X (targets x columns)")
    ap.add_argument("--targets", help=".npy of targets (with --matrix)")
    ap.add_argument("--groups", help=".npy of target group ids (optional, with --matrix)")
    ap.add_argument("--init", help=".npy of initial weights (optional, with --matrix)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic problem")
    ap.add_argument("--fit-seed", type=int, default=0, help="seed of both fits (FitConfig.seed)")
    ap.add_argument("--no-l0python", action="store_true", help="skip the l0-python baseline")
    ap.add_argument("--gpu-report", action="store_true", help="2,000-epoch timing and bandwidth ratio")
    ap.add_argument("--gpu-epochs", type=int, default=2000, help="epochs for --gpu-report")
    ap.add_argument("--shard", action="store_true",
                    help="shard=auto against shard=off (set XLA_FLAGS=--xla_force_host_platform_device_count=2 on CPU)")
    ap.add_argument("--problem", help="a fit problem written by benchmarks/dump_fit_problem.py (.npz)")
    ap.add_argument("--interleave", type=int, default=0, help="rounds of bandwidth, sparse and auto kernel fits")
    ap.add_argument("--layout-cache", help="folder for the fits' layout caches (warm setup from the second round)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="memory bandwidth in GB/s (default: measured in this run)")
    args = ap.parse_args(argv)
    if args.matrix and not args.targets:
        ap.error("--matrix needs --targets")

    args.loss_weights = args.tolerances = None
    X, targets, groups, init, label, column_groups = load_problem(args)
    print(f"{label}: {X.shape[0]} targets x {X.shape[1]:,} columns, nnz {X.nnz:,}")
    if args.interleave:
        interleaved(X, targets, groups, init, column_groups,
                    FitConfig(epochs=args.epochs, log_every=args.epochs, chunk_epochs=args.epochs, seed=args.fit_seed),
                    args.interleave, args.layout_cache, args.loss_weights, args.tolerances)
        return
    if args.shard:
        shard_report(X, targets, groups, init, column_groups,
                     FitConfig(epochs=args.epochs, log_every=args.epochs, chunk_epochs=args.epochs, seed=args.fit_seed))
        return
    if args.gpu_report:
        gpu_report(X, targets, groups, init, FitConfig(epochs=args.gpu_epochs, seed=args.fit_seed), args.bandwidth_gbs)
        return
    cfg = FitConfig(epochs=args.epochs, log_every=args.epochs, chunk_epochs=args.epochs, seed=args.fit_seed)
    loss_weights = target_loss_weights(groups, X.shape[0], cfg.balance_groups)
    res = fit_l0(X, targets, init, cfg, groups, progress=False)
    ours = (res.seconds_per_epoch, res.final_loss, data_loss(X, targets, loss_weights, res.weights))
    base = None if args.no_l0python else run_l0python(X, targets, groups, init, replace(cfg), loss_weights)

    print(f"\n{'':28s}{'s/epoch':>12s}{'objective':>14s}{'data loss':>14s}")
    print(f"{'calibrate.fit (' + res.device + ')':28s}{ours[0]:12.4f}{ours[1]:14.6g}{ours[2]:14.6g}")
    print(f"  compile {res.compile_seconds:.1f} s, total {res.total_seconds:.1f} s for {res.epochs} epochs")
    if base is not None:
        print(f"{'l0-python 0.6.2 (torch cpu)':28s}{base[0]:12.4f}{base[1]:14.6g}{base[2]:14.6g}")
        print(f"  setup (sparse conversion) {base[3]:.1f} s")
        print(f"speed-up per epoch: {base[0] / ours[0]:.1f}x; objective ratio ours/l0: {ours[1] / base[1]:.3f}; "
              f"data-loss ratio ours/l0: {ours[2] / base[2]:.3f}")
    print_bound(X, res.seconds_per_epoch, None if args.bandwidth_gbs is None else args.bandwidth_gbs * 1e9)


if __name__ == "__main__":
    main()
