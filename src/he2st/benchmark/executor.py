"""Where the tasks of a benchmark run: in this process, a local process pool, or Ray.

:func:`he2st.benchmark.run_benchmark` turns a run into a small work graph and
hands its tasks to one :class:`Executor`:

1. **feature tasks**, one per (slide, encoder settings) that the pending fits
   will read (:meth:`he2st.methods.base.Method.feature_requests`): each computes
   the frozen features of one slide into the on-disk feature cache
   (:mod:`he2st.encoders.cache`) and returns only its timing;
2. **fit tasks**, one per pending (method, fold, seed), each started once the
   feature tasks of its slides have finished (failed feature tasks do not block
   it: the fit computes what it needs): hyper-parameter search on the inner
   folds, fit, predict, score (:func:`he2st.evaluate.protocol.run_fold`). A fit
   task *returns* its record and prediction arrays (and, with ``save_models``,
   the files of the saved model);
3. the **driver** (the calling process) writes each returned result into the run
   folder atomically as it arrives, then aggregates the tables and the report.
   Workers never write the run folder, so it need not be on a shared filesystem.

Executors (``executor`` in :class:`~he2st.benchmark.config.BenchmarkConfig`,
``--executor`` on the command line):

``local``
    Every task in this process, one after the other, in the order of the run
    (the default; what earlier versions did).
``processes``
    A :class:`concurrent.futures.ProcessPoolExecutor` (spawn start method) of
    ``workers`` processes; the cohort is sent once per worker (the pool's
    initializer), not with each task.
``ray``
    Ray tasks (``ray.init()`` locally with ``workers`` CPUs, or
    ``ray_address`` for a running cluster) asking for ``cpus_per_task`` CPUs and
    ``gpus_per_task`` GPUs; the cohort is put in the object store once
    (``ray.put``). A task whose worker process dies is retried
    (``max_retries=RAY_MAX_RETRIES``); an exception raised by the task itself is
    not (``retry_exceptions=False``): it is a bad input, and would fail again.

Every task gets the driver's ``HE2ST_*`` environment variables (the feature
cache ``HE2ST_CACHE``, weights, quiet mode...), so workers read and write the
same cache as the driver when it is reachable from them.

Results do not depend on the executor: each task is a pure function of its
inputs, seeded by the method's ``seed``, so ``metrics.csv`` is the same under
all three (the records' ``timings`` differ, as between any two runs).

Fault injection (tests only): with ``HE2ST_EXECUTOR_CRASH_ONCE=<file>`` set, the
first fit task to find ``<file>`` absent creates it and ends its process with
``os._exit(1)``, as a killed worker would.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from he2st.errors import He2stInputError

#: Retries of a Ray task whose worker process died (node lost, out-of-memory kill, crash).
RAY_MAX_RETRIES = 3


class ExecutorError(He2stInputError):
    """An executor cannot be started (an option, or a missing package, named)."""


# -- tasks (run in workers) ------------------------------------------------------------------

_COHORT: Any = None  # the cohort of a pool worker, set once by its initializer


def _apply_env(env: dict[str, str]) -> None:
    """Make the worker's ``HE2ST_*`` variables those of the driver."""
    for k in [k for k in os.environ if k.startswith("HE2ST_") and k not in env]:
        del os.environ[k]
    os.environ.update(env)


def feature_task(payload: dict[str, Any], cohort: Any) -> dict[str, Any]:
    """Compute one slide's frozen features into the feature cache.

    Parameters
    ----------
    payload
        ``{"request": {...}, "env": {...}}``; the request as given by
        :meth:`~he2st.methods.base.Method.feature_requests`.
    cohort
        The run's cohort.

    Returns
    -------
    dict
        ``{"slide", "shape", "seconds"}`` (the features themselves stay in the cache).
    """
    from he2st.methods.nn.inputs import encoder_inputs

    _apply_env(payload["env"])
    r = payload["request"]
    t0 = time.perf_counter()
    x = encoder_inputs(cohort[r["slide"]], r["encoder"], r["weights"], r["patch_px"], tta=r["tta"], dtype=None,
                       target_mpp=r["target_mpp"])
    return {"slide": r["slide"], "shape": list(x.shape), "seconds": time.perf_counter() - t0}


def fit_task(payload: dict[str, Any], cohort: Any) -> dict[str, Any]:
    """Run one (method, fold, seed): search, fit, predict, score; return what the driver writes.

    Parameters
    ----------
    payload
        ``name``, ``label``, ``params``, ``grid``, ``search``, ``fold`` (a
        :class:`~he2st.evaluate.splits.Fold`), ``settings`` (genes,
        min_spots, markers, n_top, clustering, metrics, save_models) and ``env``.
    cohort
        The run's cohort.

    Returns
    -------
    dict
        ``record`` (the fold record without its ``predictions`` paths),
        ``predictions`` (per test slide: arrays and what the prediction file
        records), ``model_files`` (``{relative path: bytes}`` with ``save_models``)
        and ``seconds``.
    """
    from he2st._utils import jsonable
    from he2st.evaluate.protocol import run_fold

    _apply_env(payload["env"])
    crash = os.environ.get("HE2ST_EXECUTOR_CRASH_ONCE")
    if crash and not os.path.exists(crash):
        Path(crash).write_text(str(os.getpid()))
        os._exit(1)
    t0 = time.perf_counter()
    st = payload["settings"]
    fold = payload["fold"]
    outcome = run_fold(
        payload["name"],
        payload["params"],
        cohort,
        fold,
        st["genes"],
        label=payload["label"],
        min_spots=st["min_spots"],
        markers=st["markers"],
        n_top=st["n_top"],
        grid=payload["grid"] or None,
        search=payload["search"] or None,
        clustering=st["clustering"],
        metrics=st["metrics"],
    )
    model = outcome.model
    vm = outcome.validation_metrics
    record = {
        "params": outcome.params,
        # False: an encoder started from random weights; None: the method uses no encoder.
        "pretrained": model.pretrained,
        "panel": outcome.panel.to_dict(),
        "selection": outcome.selection,
        "missing_genes": {p.slide_id: p.missing_genes for p in outcome.predictions},
        "extra": jsonable(model.get_extra()),
        "timings": outcome.timings,
        "metrics": outcome.metrics.to_dict(orient="list"),
        "per_gene": outcome.per_gene.to_dict(orient="list"),
        # Validation slides scored as an in-distribution test (validation="score").
        "validation_metrics": None if vm is None or vm.empty else vm.to_dict(orient="list"),
    }
    predictions = [
        {
            "slide_id": p.slide_id,
            "predicted": p.predicted,
            "uncertainty": p.uncertainty,
            "observed": p.observed,
            "missing_genes": list(p.missing_genes),
        }
        for p in outcome.predictions
    ]
    model_files = None
    if st["save_models"]:
        with tempfile.TemporaryDirectory(prefix="he2st-model-") as tmp:
            model.save(Path(tmp) / "m")
            root = Path(tmp) / "m"
            model_files = {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}
    return {
        "record": record,
        "predictions": predictions,
        "genes": list(model.genes),
        "model_name": model.name,
        "normalization": model.normalizer_.method,
        "model_files": model_files,
        "seconds": time.perf_counter() - t0,
    }


TASKS: dict[str, Callable[[dict[str, Any], Any], dict[str, Any]]] = {"feature": feature_task, "fit": fit_task}


def _pool_init(cohort_bytes: bytes) -> None:
    global _COHORT
    _COHORT = pickle.loads(cohort_bytes)


def _pool_call(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    return TASKS[kind](payload, _COHORT)


def _ray_call(kind: str, payload: dict[str, Any], cohort: Any) -> dict[str, Any]:
    return TASKS[kind](payload, cohort)


# -- executors (in the driver) ---------------------------------------------------------------


@dataclass
class Done:
    """A finished task: its handle, and its result or the exception it raised.

    Parameters
    ----------
    handle
        What :meth:`Executor.submit` returned.
    result
        The task's return value (None when it failed).
    error
        The exception (None when it succeeded).
    """

    handle: Any
    result: Any = None
    error: BaseException | None = None


class Executor:
    """Runs tasks for the driver: :meth:`start`, :meth:`submit`, :meth:`wait`, :meth:`close`."""

    kind = "base"

    def start(self, cohort: Any) -> None:
        """Make the cohort available to the tasks (once).

        Parameters
        ----------
        cohort
            The run's cohort.
        """
        raise NotImplementedError

    def submit(self, kind: str, payload: dict[str, Any]) -> Any:
        """Queue a task.

        Parameters
        ----------
        kind
            ``"feature"`` or ``"fit"``.
        payload
            Its arguments (see :func:`feature_task`, :func:`fit_task`).

        Returns
        -------
        object
            A handle, returned again by :meth:`wait` when the task is done.
        """
        raise NotImplementedError

    def wait(self, handles: Sequence[Any]) -> list[Done]:
        """Block until at least one of ``handles`` is done.

        Parameters
        ----------
        handles
            Handles of unfinished tasks.

        Returns
        -------
        list of Done
            The tasks that finished.
        """
        raise NotImplementedError

    def running(self, handles: Sequence[Any]) -> int:
        """How many of ``handles`` are running (not waiting in a queue); a best guess.

        Parameters
        ----------
        handles
            Handles of unfinished tasks.

        Returns
        -------
        int
            Tasks running now.
        """
        return len(handles)

    def cancel(self, handles: Sequence[Any]) -> list[Any]:
        """Drop the tasks of ``handles`` that have not started (after a failure).

        Parameters
        ----------
        handles
            Handles of unfinished tasks.

        Returns
        -------
        list
            The handles dropped (they will never be returned by :meth:`wait`).
        """
        return []

    def close(self) -> None:
        """Release the workers (a Ray instance this executor started is shut down)."""


class LocalExecutor(Executor):
    """Every task in this process, in submission order (the serial loop)."""

    kind = "local"

    def __init__(self) -> None:
        self._cohort: Any = None
        self._queue: dict[int, tuple[str, dict[str, Any]]] = {}
        self._n = 0

    def start(self, cohort: Any) -> None:  # noqa: D102 (documented on Executor)
        self._cohort = cohort

    def submit(self, kind: str, payload: dict[str, Any]) -> int:  # noqa: D102
        self._n += 1
        self._queue[self._n] = (kind, payload)
        return self._n

    def running(self, handles: Sequence[Any]) -> int:  # noqa: D102
        return min(1, len(handles))

    def cancel(self, handles: Sequence[Any]) -> list[Any]:  # noqa: D102
        for h in handles:
            self._queue.pop(h, None)
        return list(handles)

    def wait(self, handles: Sequence[Any]) -> list[Done]:  # noqa: D102
        h = min(handles)
        kind, payload = self._queue.pop(h)
        # KeyboardInterrupt and SystemExit pass through: the driver stops as it did before.
        try:
            return [Done(h, TASKS[kind](payload, self._cohort))]
        except Exception as exc:  # noqa: BLE001 (handed to the driver, which raises it)
            return [Done(h, error=exc)]


class ProcessExecutor(Executor):
    """A local pool of ``workers`` processes (spawn), each given the cohort once."""

    kind = "processes"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = int(workers or os.cpu_count() or 1)
        self._pool: Any = None

    def start(self, cohort: Any) -> None:  # noqa: D102
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_pool_init,
            initargs=(pickle.dumps(cohort, protocol=pickle.HIGHEST_PROTOCOL),),
        )

    def submit(self, kind: str, payload: dict[str, Any]) -> Any:  # noqa: D102
        return self._pool.submit(_pool_call, kind, payload)

    def running(self, handles: Sequence[Any]) -> int:  # noqa: D102
        return sum(1 for h in handles if h.running())

    def cancel(self, handles: Sequence[Any]) -> list[Any]:  # noqa: D102
        return [h for h in handles if h.cancel()]

    def wait(self, handles: Sequence[Any]) -> list[Done]:  # noqa: D102
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as cf_wait

        done, _ = cf_wait(list(handles), return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            exc = f.exception()
            out.append(Done(f, error=exc) if exc is not None else Done(f, f.result()))
        return out

    def close(self) -> None:  # noqa: D102
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Ray tasks on a local instance (``workers`` CPUs) or on the cluster at ``address``.

    Parameters
    ----------
    workers
        CPUs of a local instance started here (default: all); ignored with ``address``.
    address
        A running cluster (``"auto"``, ``"ray://host:10001"``...); None starts a local instance.
    cpus_per_task, gpus_per_task
        Resources each task asks for.
    """

    kind = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, cpus_per_task: float = 1.0,
                 gpus_per_task: float = 0.0) -> None:
        self.workers, self.address = workers, address
        self.cpus_per_task, self.gpus_per_task = float(cpus_per_task), float(gpus_per_task)
        self._started = False
        self._cohort_ref: Any = None
        self._remote: Any = None

    def start(self, cohort: Any) -> None:  # noqa: D102
        try:
            import ray
        except ImportError:
            raise ExecutorError(
                "--executor ray: the ray package is not installed (pip install 'he2st[ray]')"
            ) from None
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is not None:
                kw["address"] = self.address
            elif self.workers is not None:
                kw["num_cpus"] = int(self.workers)
            try:
                ray.init(**kw)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ExecutorError(f"--ray-address {self.address or '(local)'}: cannot start Ray: {exc}") from None
            self._started = True
        have = ray.cluster_resources()
        for opt, need, res in (("--cpus-per-task", self.cpus_per_task, "CPU"), ("--gpus-per-task", self.gpus_per_task, "GPU")):
            if need > 0 and need > have.get(res, 0.0):
                self.close()
                raise ExecutorError(
                    f"{opt} {need:g}: the Ray cluster has {have.get(res, 0.0):g} {res}(s) in all, so no task could ever start"
                )
        self._cohort_ref = ray.put(cohort)
        self._remote = ray.remote(_ray_call).options(
            num_cpus=self.cpus_per_task,
            num_gpus=self.gpus_per_task,
            max_retries=RAY_MAX_RETRIES,
            retry_exceptions=False,
        )

    def submit(self, kind: str, payload: dict[str, Any]) -> Any:  # noqa: D102
        return self._remote.remote(kind, payload, self._cohort_ref)

    def running(self, handles: Sequence[Any]) -> int:  # noqa: D102
        return len(handles)

    def wait(self, handles: Sequence[Any]) -> list[Done]:  # noqa: D102
        import ray

        ready, _ = ray.wait(list(handles), num_returns=1)
        out = []
        for ref in ready:
            try:
                out.append(Done(ref, ray.get(ref)))
            except Exception as exc:  # noqa: BLE001
                out.append(Done(ref, error=_unwrap_ray_error(exc)))
        return out

    def close(self) -> None:  # noqa: D102
        self._cohort_ref = None
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _unwrap_ray_error(exc: BaseException) -> BaseException:
    """The task's own exception when Ray wrapped one (so the CLI prints it as usual)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def make_executor(kind: str = "local", workers: int | None = None, ray_address: str | None = None,
                  cpus_per_task: float = 1.0, gpus_per_task: float = 0.0) -> Executor:
    """The executor named by a configuration.

    Parameters
    ----------
    kind
        ``"local"``, ``"processes"`` or ``"ray"``.
    workers
        Processes of the pool; CPUs of a local Ray instance.
    ray_address
        A Ray cluster to connect to (``ray`` only).
    cpus_per_task, gpus_per_task
        Resources of each Ray task.

    Returns
    -------
    Executor
        Not started yet.

    Raises
    ------
    ExecutorError
        An unknown kind.
    """
    if kind == "local":
        return LocalExecutor()
    if kind == "processes":
        return ProcessExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, ray_address, cpus_per_task, gpus_per_task)
    raise ExecutorError(f"--executor: expected local, processes or ray, got {kind!r}")


# -- the work graph (driver side) ------------------------------------------------------------


@dataclass
class Task:
    """One node of the work graph.

    Parameters
    ----------
    key
        Unique name (shown in progress lines).
    kind
        ``"feature"`` or ``"fit"``.
    payload
        Its arguments.
    deps
        Keys of the tasks to finish first.
    on_done
        Called in the driver with the result (writes the fold record).
    """

    key: str
    kind: str
    payload: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    on_done: Callable[[Any], None] | None = None


class Progress:
    """The live view: one stderr line per state change (tasks done / running / failed / left).

    Silent with ``quiet`` or ``HE2ST_QUIET=1``.

    Parameters
    ----------
    total
        Number of tasks.
    quiet
        Print nothing.
    """

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.done, self.failed, self.running = total, 0, 0, 0
        self.quiet = quiet or is_quiet_env()

    def update(self, event: str, running: int) -> None:
        """Record a state change and print the line.

        Parameters
        ----------
        event
            What happened (``"fit ridge/fold s1 done"``).
        running
            Tasks submitted and not finished.
        """
        self.running = running
        if self.quiet:
            return
        left = self.total - self.done - self.failed - self.running
        print(
            f"[he2st] tasks {self.done}/{self.total} done, {self.running} running, {self.failed} failed, "
            f"{left} waiting | {event}",
            file=sys.stderr,
            flush=True,
        )


def is_quiet_env() -> bool:
    """Whether ``HE2ST_QUIET`` asks for silence.

    Returns
    -------
    bool
        True when set to anything but ``""`` or ``"0"``.
    """
    return os.environ.get("HE2ST_QUIET", "") not in ("", "0")


def run_graph(executor: Executor, tasks: Sequence[Task], quiet: bool = False) -> dict[str, Any]:
    """Run a work graph: each task once its dependencies are finished; results handled as they come.

    A failed feature task is reported and its dependants run anyway (a fit
    computes the features it lacks). After a failed fit task nothing new is
    started and queued tasks are dropped where the executor can (``local``,
    ``processes``); the tasks running finish (their results are kept), then the
    first error is raised.

    Parameters
    ----------
    executor
        A started executor.
    tasks
        The graph, in the order tasks should start (dependencies first).
    quiet
        No progress lines.

    Returns
    -------
    dict
        ``{task key: result}`` of the tasks that succeeded.
    """
    pending = list(tasks)
    finished: set[str] = set()
    results: dict[str, Any] = {}
    in_flight: dict[Any, Task] = {}
    first_error: BaseException | None = None
    prog = Progress(len(tasks), quiet)
    while pending or in_flight:
        if first_error is None:
            ready = [t for t in pending if all(d in finished for d in t.deps)]
            for t in ready:
                pending.remove(t)
                in_flight[executor.submit(t.kind, t.payload)] = t
            if ready:
                prog.update(f"started {len(ready)} task(s)", executor.running(list(in_flight)))
        elif not in_flight:
            break
        if not in_flight:
            continue
        for d in executor.wait(list(in_flight)):
            t = in_flight.pop(d.handle)
            finished.add(t.key)
            if d.error is None:
                results[t.key] = d.result
                if t.on_done is not None:
                    t.on_done(d.result)
                prog.done += 1
                event = f"{t.key} done"
            else:
                prog.failed += 1
                event = f"{t.key} FAILED: {type(d.error).__name__}: {d.error}"
                if t.kind == "fit" and first_error is None:
                    first_error = d.error
                    for h in executor.cancel(list(in_flight)):  # queued, not started: never run
                        in_flight.pop(h)
            prog.update(event, executor.running(list(in_flight)))
    if first_error is not None:
        raise first_error
    return results


def driver_env() -> dict[str, str]:
    """The ``HE2ST_*`` environment variables handed to every task.

    Returns
    -------
    dict
        Name to value.
    """
    return {k: v for k, v in os.environ.items() if k.startswith("HE2ST_")}


__all__ = [
    "Done",
    "Executor",
    "ExecutorError",
    "LocalExecutor",
    "ProcessExecutor",
    "Progress",
    "RAY_MAX_RETRIES",
    "RayExecutor",
    "Task",
    "driver_env",
    "feature_task",
    "fit_task",
    "make_executor",
    "run_graph",
]
