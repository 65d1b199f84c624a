"""Where the forward passes run: ``local`` (this process) or ``ray`` (actors of a Ray cluster).

A Ray extraction splits the manifest into row ranges (shards) whose boundaries are multiples of
the batch size, so every batch holds the same images as in a local run and the store comes out
bit for bit the same. Each actor holds one model replica (a GPU when the cluster has one, else one
CPU) and writes each shard it is given as a store of its own under ``<out>.shards/``; the driver
then appends the finished shards, in row order, to the store at ``out`` through the same
:class:`~conceptlens.core.store.StoreWriter` a local run uses, and removes them.

Failures: an actor that dies is restarted and its shard retried by Ray (``max_restarts``,
``max_task_retries``); a retried shard resumes or rewrites its own store, and the driver appends a
shard only once it is complete, so every row lands exactly once. An interrupted run resumes by
shard: finished shards are reused, appended ones skipped. An actor that cannot see the data
folder, or loads weights other than the driver's, stops the run with a line naming its node.

The actors get the driver's manifest (an in-memory one too, e.g. a Broden set's) through Ray's
object store; the images must be at the same paths on every node. Mergeable observers (top-k)
are filled in the actors, one per shard, and merged by the driver in row order.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

from ..errors import ConceptLensError

__all__ = ["ENGINES", "check_engine", "ray_extract", "shard_ranges"]

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
RAY_INSTALL = 'pip install "conceptlens[ray]"'


def _ray():
    try:
        import ray
    except ImportError:
        raise ConceptLensError(f"--engine ray needs Ray, which is not installed; install it with {RAY_INSTALL}") from None
    return ray


def shard_ranges(n_rows, batch_size, n_shards):
    """``[(start, stop), ...]`` covering ``range(n_rows)`` in at most ``n_shards`` ranges whose starts
    are multiples of ``batch_size`` (so each shard's batches are a local run's batches)."""
    batches = -(-n_rows // batch_size)
    per = max(1, -(-batches // max(1, int(n_shards))))
    return [(b * batch_size, min(n_rows, (b + per) * batch_size)) for b in range(0, batches, per)]


class _ShardWorker:
    """One model replica on one node: extracts the shards it is given (a Ray actor's class).

    The model loads when the actor starts, while the driver hashes the manifest; a replica whose
    weights differ from the driver's refuses every shard."""

    def __init__(self, spec, device, weights_hash, threads):
        import socket

        import torch

        from ..models import load_model

        torch.set_num_threads(threads)
        self.where = f"node {socket.gethostname()}"
        self.model = load_model(spec, device=device)
        self.mismatch = None if self.model.weights_hash == weights_hash else (
            f"{self.where}: {spec} loads weights {self.model.weights_hash[:12]}, not the driver's {weights_hash[:12]}; "
            "give every node the same weights file")

    def run(self, job, manifest, start, stop, shard_dir):
        """Extract rows ``start:stop`` of ``manifest`` (the driver's, from the object store) into
        ``shard_dir``; returns the shard's filled observers."""
        from ..data import make_loader
        from .extract import _Target, _write_pass
        from .store import StoreWriter

        if self.mismatch:
            raise ConceptLensError(self.mismatch)
        if not manifest.root.is_dir():
            raise ConceptLensError(f"{self.where}: the data folder {manifest.root} (of {manifest.path}) does not exist "
                                   "there; every node needs the data at the same path (a shared file system)")
        writer = StoreWriter(shard_dir, {**job["request"], "shard": [start, stop]}, stop - start)
        observers = job["observers"]  # fresh, empty copies (deserialised per call and per retry)
        if Path(shard_dir).is_dir() and not (Path(shard_dir) / "meta.json").is_file():
            shutil.rmtree(shard_dir)  # an actor killed while it created this shard's files: start it again
        state = writer.existing()
        if state and observers:  # the observers must see every row of the shard
            writer.restart()
            state = None
        if state == "complete":
            return observers
        first = writer.rows_completed if state == "resume" else start
        batches = make_loader(manifest, job["preprocessing"], batch_size=job["batch_size"], skip_bad=job["skip_bad"],
                              rows=range(first, stop))
        target = _Target(writer, list(job["layers"]), job["pool"], job["dtype"])
        _write_pass(self.model, batches, [target], observers, False, first, stop, False)
        writer.finish(manifest.frame, rows=range(start, stop))
        return observers


def _cluster(ray, address):
    if not ray.is_initialized():
        t = time.perf_counter()
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        logger.info("ray: connected to %s in %.1f s", address or "a new local instance", time.perf_counter() - t)
    resources = ray.cluster_resources()
    return int(resources.get("CPU", 1)), int(resources.get("GPU", 0))


def _append(writer, shard, start, stop):
    """Append a finished shard store's rows to ``writer`` (chunked file reads)."""
    from .store import ActivationStore

    store = ActivationStore.open(shard)
    if writer.meta is None:
        writer.create({layer: tuple(store.meta["shapes"][layer]) for layer in store.layers}, store.meta["dtype"])
    chunks = {layer: store.iter_chunks(layer, dtype=store.meta["dtype"]) for layer in store.layers}
    for parts in zip(*chunks.values()):
        writer.write({layer: arr for layer, (_, arr) in zip(chunks, parts)}, start)
    writer.write({}, stop, store.skipped)


def ray_extract(model, manifest, request_of, out, batch_size=64, skip_bad=False, prep=None, observers=(), shards=None,
                actors=None, address=None, progress=True):
    """Write the store of ``request_of()`` at ``out`` with Ray actors (see the module notes).

    Called by :func:`~conceptlens.core.extract.extract` with ``engine="ray"``. ``request_of()``
    returns ``(layers, pool, dtype, request)`` (it hashes the manifest's images, which overlaps
    with the actors' start-up). ``shards`` defaults to four per actor, ``actors`` to the cluster's
    GPUs, else its CPUs; ``address`` is Ray's (default ``RAY_ADDRESS``, else a new local instance).

    ``observers`` (mergeable accumulators with ``empty()`` and ``merge()``, e.g.
    :class:`~conceptlens.core.topk.TopK`) run next to the data: each shard fills an empty copy,
    the driver merges them in row order and updates each observer in place with the result, as a
    local extraction would have. With observers, an unfinished store is rewritten, not resumed
    (the observers must see every row).
    """
    from tqdm.auto import tqdm

    from .store import ActivationStore, StoreWriter

    ray = _ray()
    if shards is not None and not (isinstance(shards, int) and shards >= 1):
        raise ConceptLensError(f"shards must be an integer >= 1; got {shards!r}")
    cpus, gpus = _cluster(ray, address)
    n_actors = int(actors or gpus or cpus)
    ranges = shard_ranges(len(manifest), batch_size, shards or 4 * n_actors)
    options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    worker = ray.remote(max_restarts=2, max_task_retries=2, **options)(_ShardWorker)
    threads = 1 if not gpus else max(1, cpus // max(1, n_actors))
    run_id = uuid.uuid4().hex[:8]  # actor names (`ray list actors`): conceptlens-extract-<run>-<k>
    pool_ = [worker.options(name=f"conceptlens-extract-{run_id}-{k}").remote(
        model.spec, "cuda" if gpus else "cpu", model.weights_hash, threads) for k in range(min(n_actors, len(ranges)))]
    try:
        layers, pool, dtype, request = request_of()
        writer = StoreWriter(Path(out), request, len(manifest))
        state = writer.existing()
        if state == "complete":
            logger.info("activation store %s is complete for this request: reusing it", out)
            return ActivationStore.open(out)
        shard_root = Path(f"{Path(out)}.shards")
        if observers and state == "resume":
            logger.info("store %s: rewriting it from the first row, so the observers see every row", out)
            writer.restart()
            state = None
        done = _resume_point(writer, state, ranges, shard_root)
        todo = [(i, a, b) for i, (a, b) in enumerate(ranges) if b > done]
        job = {"preprocessing": prep, "layers": list(layers), "pool": pool,
               "dtype": dtype, "batch_size": batch_size, "skip_bad": skip_bad, "request": request,
               "observers": [o.empty() for o in observers]}
        merged = list(observers)
        # Shards go to the actors in turn; each actor runs its queue in order.
        manifest_ref = ray.put(manifest)  # once in the object store, not once per shard
        pending = {i: pool_[j % len(pool_)].run.remote(job, manifest_ref, a, b, str(shard_root / f"{i:05d}"))
                   for j, (i, a, b) in enumerate(todo)}
        with tqdm(total=len(manifest), initial=done, desc="extract (ray)", unit="img", disable=not progress) as bar:
            for i, a, b in todo:  # append in row order as shards finish
                try:
                    filled = ray.get(pending[i])
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(getattr(exc, "cause", None), ConceptLensError):
                        raise ConceptLensError(str(exc.cause)) from None
                    raise
                _append(writer, shard_root / f"{i:05d}", a, b)
                merged = [m.merge(f) for m, f in zip(merged, filled)]
                bar.update(b - bar.n)
    finally:
        for actor in pool_:
            ray.kill(actor)
    for observer, result in zip(observers, merged):
        vars(observer).update(vars(result))  # in place, as a local pass updates its observers
    store = writer.finish(manifest.frame)
    shutil.rmtree(shard_root, ignore_errors=True)
    logger.info("ray: %d shards on %d actors -> %s", len(ranges), len(pool_), out)
    return store


def _resume_point(writer, state, ranges, shard_root):
    """The row an unfinished store resumes at: the end of its last appended shard (0 to rewrite it)."""
    from .store import ActivationStore

    done = writer.rows_completed if state == "resume" else 0
    if not done:
        return 0
    appended = [shard_root / f"{i:05d}" for i, (_, b) in enumerate(ranges) if b <= done]
    if done not in {b for _, b in ranges} or not all((d / "meta.json").is_file() for d in appended):
        logger.info("store %s cannot resume by shard (other shards, or their stores are gone): rewriting it", writer.path)
        writer.restart()
        return 0
    # Rows of a shard interrupted while it was appended lie past the appended shards' rows: drop them.
    writer.meta["n_rows"] = sum(ActivationStore.open(d).n_rows for d in appended)
    return done


def check_engine(engine):
    """Raise for an unknown engine name, or for ``ray`` without Ray installed; return the name."""
    if engine not in ENGINES:
        raise ConceptLensError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "ray":
        _ray()
    return engine
