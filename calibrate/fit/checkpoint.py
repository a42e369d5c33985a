"""Atomic, fingerprinted checkpoints of the L0 fit (npz: params, optimiser state, key, epoch).

A checkpoint stores a SHA-256 fingerprint of the problem (X, targets, initial weights,
per-target loss weights and every config field that changes the optimisation path). Resuming with a
different problem raises ``CheckpointMismatchError`` instead of silently continuing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
import scipy.sparse as sp

# Config fields that only steer logging/saving/chunking, not the optimisation path:
# a fit may be resumed with different values (notably more epochs).
_PATH_NEUTRAL_FIELDS = frozenset({"epochs", "log_every", "checkpoint_every", "chunk_epochs"})


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was written for a different problem or configuration."""


@dataclass(frozen=True)
class Checkpoint:
    """Training state at the end of ``epoch`` (arrays in the fit's internal layout)."""

    fingerprint: str
    epoch: int
    param_leaves: list[np.ndarray]
    opt_leaves: list[np.ndarray]
    key_data: np.ndarray
    history: dict[str, np.ndarray]
    lambdas: np.ndarray | None = None  # per-group L0 weights (sparsity controller state)


def problem_fingerprint(
    X: sp.csr_matrix,
    targets: np.ndarray,
    init_weights: np.ndarray,
    loss_weights: np.ndarray | None,
    config: object,
    tolerances: np.ndarray | None = None,
    column_groups: np.ndarray | None = None,
) -> str:
    """SHA-256 over X (canonical CSR), targets, initial weights, per-target loss weights and
    path-relevant config."""
    digest = hashlib.sha256()
    digest.update(np.asarray(X.shape, dtype=np.int64).tobytes())
    for part in (X.indptr.astype(np.int64), X.indices.astype(np.int64), X.data.astype(np.float64)):
        digest.update(np.ascontiguousarray(part).tobytes())
    digest.update(np.ascontiguousarray(targets, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(init_weights, dtype=np.float64).tobytes())
    digest.update(b"no-weights" if loss_weights is None else np.ascontiguousarray(loss_weights, np.float64).tobytes())
    for name, extra in (("tolerances", tolerances), ("column_groups", column_groups)):
        if extra is not None:
            digest.update(name.encode() + np.ascontiguousarray(extra).tobytes())
    relevant = [
        (f.name, value)
        for f, value in zip(fields(config), astuple(config))  # type: ignore[arg-type, call-overload]
        if f.name not in _PATH_NEUTRAL_FIELDS
    ]
    if hasattr(config, "polish_epochs"):  # derived from epochs, but it changes the path
        relevant.append(("polish_epochs", config.polish_epochs))
    digest.update(repr(relevant).encode())
    return digest.hexdigest()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write the checkpoint atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        "fingerprint": np.array(checkpoint.fingerprint),
        "epoch": np.array(checkpoint.epoch, dtype=np.int64),
        "key_data": checkpoint.key_data,
        "n_params": np.array(len(checkpoint.param_leaves)),
        "n_opt": np.array(len(checkpoint.opt_leaves)),
    }
    if checkpoint.lambdas is not None:
        arrays["lambdas"] = checkpoint.lambdas
    arrays.update({f"param_{i}": leaf for i, leaf in enumerate(checkpoint.param_leaves)})
    arrays.update({f"opt_{i}": leaf for i, leaf in enumerate(checkpoint.opt_leaves)})
    arrays.update({f"history_{name}": values for name, values in checkpoint.history.items()})
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, expected_fingerprint: str) -> Checkpoint:
    """Read a checkpoint and check it belongs to this problem (else CheckpointMismatchError)."""
    with np.load(Path(path), allow_pickle=False) as data:
        fingerprint = str(data["fingerprint"])
        if fingerprint != expected_fingerprint:
            raise CheckpointMismatchError(
                f"checkpoint {path} was written for a different problem or config "
                f"(fingerprint {fingerprint[:12]}..., this fit {expected_fingerprint[:12]}...); "
                "delete it or pass another checkpoint_path"
            )
        return Checkpoint(
            fingerprint=fingerprint,
            epoch=int(data["epoch"]),
            param_leaves=[data[f"param_{i}"] for i in range(int(data["n_params"]))],
            opt_leaves=[data[f"opt_{i}"] for i in range(int(data["n_opt"]))],
            key_data=data["key_data"],
            history={
                name[len("history_"):]: data[name] for name in data.files if name.startswith("history_")
            },
            lambdas=data["lambdas"] if "lambdas" in data.files else None,
        )


def to_checkpoint(state, key, epoch: int, history: list[dict], fingerprint: str, columns: list[str]) -> Checkpoint:
    """A :class:`Checkpoint` of a fit's ``TrainState`` (host copies of every array)."""
    import jax
    import pandas as pd

    frame = pd.DataFrame(history, columns=columns)
    return Checkpoint(
        fingerprint=fingerprint,
        epoch=epoch,
        param_leaves=[np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)],
        opt_leaves=[np.asarray(x) for x in jax.tree_util.tree_leaves(state.opt_state)],
        key_data=np.asarray(jax.random.key_data(key)),
        history={c: frame[c].to_numpy() for c in columns},
        lambdas=np.asarray(state.lambdas),
    )


def restore_state(fresh, checkpoint: Checkpoint):
    """(state, key, epoch, history) from a checkpoint, using ``fresh`` for the tree structures."""
    import jax
    import jax.numpy as jnp
    import pandas as pd

    def rebuild(template, leaves):
        treedef = jax.tree_util.tree_structure(template)
        old = jax.tree_util.tree_leaves(template)
        if len(old) != len(leaves) or any(np.shape(a) != np.shape(b) for a, b in zip(old, leaves)):
            raise CheckpointMismatchError("checkpoint arrays do not match this problem's parameter shapes")
        return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x, dtype=jnp.asarray(o).dtype)
                                                      for o, x in zip(old, leaves)])

    params = rebuild(fresh.params, checkpoint.param_leaves)
    opt_state = rebuild(fresh.opt_state, checkpoint.opt_leaves)
    lambdas = fresh.lambdas if checkpoint.lambdas is None else jnp.asarray(checkpoint.lambdas, jnp.float32)
    key = jax.random.wrap_key_data(jnp.asarray(checkpoint.key_data))
    history = pd.DataFrame(checkpoint.history).to_dict("records")
    return type(fresh)(params, opt_state, fresh.divergence, lambdas), key, checkpoint.epoch, history
