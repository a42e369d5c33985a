"""Atomic, fingerprinted checkpoints of the L0 fit (npz: params, optimiser state, key, epoch).

A checkpoint stores a SHA-256 fingerprint of the problem (X, targets, initial weights,
per-target loss weights and every config field that changes the optimisation path) and,
separately, of the config alone (:func:`config_fingerprint`), so a rerun can be checked
against it before the matrix exists (:func:`resumable_epoch`). Resuming with a different
problem raises ``CheckpointMismatchError`` instead of silently continuing.

The schedule is part of the config: the sparsity ramp's length and the polish start
(:func:`path_schedule`) both follow ``epochs``, so more epochs continue the same path only when
neither is in use (a fixed ``lambda_l0`` and no polish); otherwise the rerun is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
import scipy.sparse as sp

# Config fields that only steer logging/saving/chunking, or act on the path only through the
# schedule (path_schedule, fingerprinted instead): a fit may be resumed with different values.
_PATH_NEUTRAL_FIELDS = frozenset({"epochs", "log_every", "checkpoint_every", "chunk_epochs", "polish_epochs"})
HASH_CHUNK_BYTES = 1 << 24  # raw buffers are hashed 16 MB at a time (no widened copy of X)


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was written for a different problem or configuration."""


class CheckpointWriteError(OSError):
    """The checkpoint could not be written (full disk, permissions); ``path`` names the file."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(cause.errno, f"cannot write the fit checkpoint {path}: {cause.strerror or cause}")
        self.path = path


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
    config_fingerprint: str = ""  # config_fingerprint() of the fit that wrote it ("" before it existed)
    schedule: str = ""  # json of path_schedule() plus epochs, for messages


def path_schedule(config) -> dict:
    """What of the schedule steers the path: the ramp length (None without a sparsity target)
    and the polish start (None without polish). Both follow ``epochs`` when in use."""
    from calibrate.fit.sparsity import schedule_of

    schedule = schedule_of(config)
    return {"ramp_epochs": schedule.ramp_epochs if config.controlled else None,
            "polish_start": schedule.polish_start if config.polish_epochs > 0 else None}


def schedule_record(config) -> str:
    """The json a checkpoint keeps of its schedule: epochs and :func:`path_schedule`."""
    return json.dumps({"epochs": int(config.epochs), **path_schedule(config)})


def config_fingerprint(config) -> str:
    """SHA-256 of the path-relevant config fields and the schedule (no arrays: cheap, early)."""
    relevant = [
        (f.name, value)
        for f, value in zip(fields(config), astuple(config))
        if f.name not in _PATH_NEUTRAL_FIELDS
    ]
    return hashlib.sha256(repr((relevant, sorted(path_schedule(config).items()))).encode()).hexdigest()


def _hash_array(digest, array: np.ndarray) -> None:
    """Feed the array's dtype, shape and raw bytes, a chunk at a time (no copy when contiguous)."""
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    flat = array.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, HASH_CHUNK_BYTES):
        digest.update(memoryview(flat[start:start + HASH_CHUNK_BYTES]))  # type: ignore[arg-type]  # ndarray is a buffer


def problem_fingerprint(
    X: sp.csr_matrix,
    targets: np.ndarray,
    init_weights: np.ndarray,
    loss_weights: np.ndarray | None,
    config: object,
    tolerances: np.ndarray | None = None,
    column_groups: np.ndarray | None = None,
) -> str:
    """SHA-256 over X (canonical CSR, raw buffers in their own dtypes), targets, initial weights,
    per-target loss weights and :func:`config_fingerprint`."""
    digest = hashlib.sha256()
    digest.update(np.asarray(X.shape, dtype=np.int64).tobytes())
    for part in (X.indptr, X.indices, X.data):
        _hash_array(digest, part)
    _hash_array(digest, np.asarray(targets, dtype=np.float64))
    _hash_array(digest, np.asarray(init_weights, dtype=np.float64))
    if loss_weights is None:
        digest.update(b"no-weights")
    else:
        _hash_array(digest, np.asarray(loss_weights, np.float64))
    for name, extra in (("tolerances", tolerances), ("column_groups", column_groups)):
        if extra is not None:
            digest.update(name.encode())
            _hash_array(digest, np.asarray(extra))
    digest.update(config_fingerprint(config).encode())
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
        "config_fingerprint": np.array(checkpoint.config_fingerprint),
        "schedule": np.array(checkpoint.schedule),
    }
    if checkpoint.lambdas is not None:
        arrays["lambdas"] = checkpoint.lambdas
    arrays.update({f"param_{i}": leaf for i, leaf in enumerate(checkpoint.param_leaves)})
    arrays.update({f"opt_{i}": leaf for i, leaf in enumerate(checkpoint.opt_leaves)})
    arrays.update({f"history_{name}": values for name, values in checkpoint.history.items()})
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointWriteError(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CheckpointWriteError(path, exc) from exc
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
            config_fingerprint=str(data["config_fingerprint"]) if "config_fingerprint" in data.files else "",
            schedule=str(data["schedule"]) if "schedule" in data.files else "",
        )


def describe_schedule(epochs: int, schedule: dict, epochs_key: str = "epochs") -> str:
    """``epochs=E (sparsity ramp over R epochs, polish from epoch P)`` for messages."""
    parts = [f"sparsity ramp over {schedule['ramp_epochs']} epochs" if schedule.get("ramp_epochs") else "",
             f"polish from epoch {schedule['polish_start']}" if schedule.get("polish_start") else ""]
    shown = ", ".join(p for p in parts if p)
    return f"{epochs_key}={epochs}" + (f" ({shown})" if shown else "")


def resumable_epoch(path: Path, config, epochs_key: str = "epochs") -> int:
    """The epoch a fit with ``config`` would resume from at ``path``, checked against the config
    part of the checkpoint's fingerprint (no matrix needed); CheckpointMismatchError if it
    cannot continue on the same path, ValueError/OSError/KeyError if the file is unreadable.
    ``epochs_key`` names the epochs setting in messages (``fit.epochs`` for the CLI)."""
    with np.load(Path(path), allow_pickle=False) as data:
        epoch = int(data["epoch"])
        stored = str(data["config_fingerprint"]) if "config_fingerprint" in data.files else ""
        schedule = json.loads(str(data["schedule"])) if "schedule" in data.files and str(data["schedule"]) else {}
    if epoch > config.epochs:
        raise CheckpointMismatchError(f"checkpoint {path} is at epoch {epoch}, beyond {epochs_key}={config.epochs}")
    if stored == config_fingerprint(config):
        return epoch
    if not stored:
        raise CheckpointMismatchError(f"checkpoint {path} was written by an older version (no config fingerprint)")
    then = {k: schedule.get(k) for k in ("ramp_epochs", "polish_start")}
    now = path_schedule(config)
    if schedule and then != now:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for {describe_schedule(int(schedule['epochs']), then, epochs_key)}; "
            f"{describe_schedule(config.epochs, now, epochs_key)} moves the schedule, so the fit cannot continue on the "
            f"same path: rerun with {epochs_key}={schedule.get('epochs')}")
    raise CheckpointMismatchError(f"checkpoint {path} was written with other fit settings")



def to_checkpoint(state, key, epoch: int, history: list[dict], fingerprint: str, columns: list[str],
                  config=None) -> Checkpoint:
    """A :class:`Checkpoint` of a fit's ``TrainState`` (host copies of every array); ``config``
    (the fit's FitConfig) adds the config fingerprint and schedule an early rerun check reads."""
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
        config_fingerprint="" if config is None else config_fingerprint(config),
        schedule="" if config is None else schedule_record(config),
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
