"""The one thread that drives the engine's scheduler for the HTTP server.

The scheduler is not thread-safe, and the model should not run two forwards at once on a small CPU, so
one background thread owns both. Everything else talks to it through thread-safe hand-offs:

- ``submit(requests, sink)``: queue requests (checked against ``max_queue``); every ``TokenEvent`` of
  those requests is passed to ``sink(event, trace_entry)`` from the runner thread, right after the step
  that made it (the asyncio side wraps ``loop.call_soon_threadsafe``).
- ``abort(requests)``: cancel (client went away); the scheduler frees the slots at its next step.
- ``call(fn)``: run ``fn()`` on the runner thread between two steps (model use outside the scheduler,
  e.g. the playground's distribution, scoring), returning a ``concurrent.futures.Future``. Scoring work
  that runs there steps the scheduler between its forwards (``yield_point``), so it never freezes the
  other streams.

Queue accounting counts rows of work, not HTTP requests: a request's ``n`` samples count n, a beam search
of width W counts W (whatever its ``n``), and a ``call`` its ``cost`` (e.g. a guided_choice's options)
while it waits or runs. ``max_queue`` bounds the sum; past it ``submit`` and ``call`` raise ``QueueFull``.

The loop steps while there is work and sleeps on a condition variable otherwise. If a step raises (a
bug), every request in flight is finished with ``finish_reason="error"`` and the scheduler is emptied,
so the server keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

from ..decoding.scheduler import Request, TokenEvent
from ..decoding.yield_point import installed

log = logging.getLogger("logitlab.server")

Sink = Callable[[TokenEvent, "dict | None"], None]


class QueueFull(Exception):
    pass


def request_cost(items) -> int:
    """Rows of work: 1 per request, W per group of W rows (a beam search of width W, a speculative decode):
    its requests, or the group itself waiting in the scheduler."""
    cost, beams = 0, set()
    for it in list(items):
        group = (it.beam or it.spec or it.choice) if isinstance(it, Request) else it
        if group is None:
            cost += 1
        elif id(group) not in beams:
            beams.add(id(group))
            cost += getattr(group, "W", 1)
    return cost


class Runner:
    def __init__(self, engine, max_queue: int = 256, metrics=None):
        self.engine = engine
        self.scheduler = engine.scheduler
        self.max_queue = max_queue
        self.metrics = metrics
        self._cv = threading.Condition()
        self._inbox: list[tuple[list[Request], Sink, int]] = []
        self._inbox_count = 0  # the cost (rows of work) of the requests in the inbox,
        self._waiting_cost = 0  # of those in the scheduler's queue (set by the runner thread),
        self._calls_cost = 0  # and of the calls waiting or running
        self._aborts: list[Request] = []
        self._calls: list[tuple[Callable, concurrent.futures.Future, int]] = []
        self._sinks: dict[int, Sink] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="logitlab-runner", daemon=True)
        self.steps = 0
        self.step_seconds = 0.0
        self.crashes = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Runner:
        with self._cv:
            if self._thread.ident is None:
                self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The loop runs, or has not been started yet (it starts on the first request)."""
        return not self._stopping and (self._thread.is_alive() or self._thread.ident is None)

    # ---- thread-safe API ---------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Work submitted but not yet running, in rows (see the module doc; an approximate, lock-free read)."""
        return self._inbox_count + self._waiting_cost + self._calls_cost

    @property
    def running(self) -> int:
        """Requests being generated: rows of the batch, and the hypotheses of running beam searches."""
        return len(self.scheduler.running) + sum(len(g.requests) for g in self.scheduler.groups)

    def _ensure_started(self) -> None:
        # normally started by the app's lifespan; started here too for servers that skip lifespan events
        if not self._stopping and not self._thread.is_alive() and self._thread.ident is None:
            self.start()

    def submit(self, requests: list[Request], sink: Sink) -> None:
        self._ensure_started()
        cost = request_cost(requests)
        with self._cv:
            self._check_room(cost)
            self._inbox.append((requests, sink, cost))
            self._inbox_count += cost
            self._cv.notify()

    def _check_room(self, cost: int) -> None:
        if self._stopping:
            raise QueueFull("the server is shutting down")
        if self.queued + cost > self.max_queue:
            raise QueueFull(f"the queue is full ({self.queued} of {self.max_queue} rows of work waiting; this "
                            f"request needs {cost}); retry later")

    def abort(self, requests: list[Request]) -> None:
        with self._cv:
            self._aborts.extend(r for r in requests if not r.finished)
            self._cv.notify()

    def call(self, fn: Callable, cost: int = 0) -> concurrent.futures.Future:
        """``cost``: the rows of work ``fn`` stands for in the queue accounting (QueueFull without room)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._ensure_started()
        with self._cv:
            if self._stopping:
                fut.set_exception(RuntimeError("the server is shutting down"))
                return fut
            if cost:
                self._check_room(cost)
                self._calls_cost += cost
            self._calls.append((fn, fut, cost))
            self._cv.notify()
        return fut

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            with self._cv:
                while not (self._stopping or self._inbox or self._aborts or self._calls or sched.has_work()):
                    self._cv.wait()
                if self._stopping:
                    break
                calls, self._calls = self._calls, []
            for fn, fut, cost in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        # work that steps the engine's scheduler itself (a mode run to its end) or yields
                        # between its forwards (scoring) keeps the other streams flowing (yield_point.py)
                        with installed(self._tick):
                            result = fn()
                        fut.set_result(result)
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
                with self._cv:
                    self._calls_cost -= cost
            self._tick()
        self._drain_on_stop()

    def _tick(self) -> None:
        """Take the new requests and aborts, then run one scheduler step (when there is work) and hand
        its events out."""
        sched = self.scheduler
        with self._cv:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for requests, sink, cost in inbox:
            for r in requests:
                self._sinks[r.id] = sink
            try:
                sched.add(requests)
            except Exception as e:  # noqa: BLE001 - e.g. a beam search that can never fit: fail those only
                for r in requests:
                    r.finish_reason, r.error = "error", str(e)
                self._dispatch([TokenEvent(r, None, "", finish_reason="error") for r in requests])
            with self._cv:
                self._inbox_count -= cost
        self._waiting_cost = request_cost(sched.waiting)
        for r in aborts:
            if r.id in self._sinks and not r.finished:
                sched.abort(r)
        if not sched.has_work():
            return
        t0 = time.perf_counter()
        try:
            events = sched.step()
        except Exception as e:  # a bug: fail what is in flight, keep serving
            log.exception("scheduler step failed; failing the requests in flight")
            self.crashes += 1
            events = self._fail_all(e)
        self.steps += 1
        self.step_seconds += time.perf_counter() - t0
        self._waiting_cost = request_cost(sched.waiting)
        self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for ev in events:
            r = ev.request
            sink = self._sinks.get(r.id)
            if ev.finish_reason is not None:
                self._sinks.pop(r.id, None)
            if sink is None:
                continue
            trace = None
            if ev.token_id is not None and r.params.explain and r.trace:
                trace = r.trace[-1]
            try:
                sink(ev, trace)
            except Exception:  # e.g. the event loop is gone: nobody is listening any more
                log.debug("dropping an event for request %s", r.id, exc_info=True)
                if ev.finish_reason is None:
                    self.scheduler.abort(r)

    def _fail_all(self, exc: Exception) -> list[TokenEvent]:
        sched = self.scheduler
        events = []
        # beam searches (waiting or running) stand for their hypotheses' requests
        units = list(getattr(sched, "prefilling", []))
        items = list(sched.running) + list(sched.waiting) + list(sched.groups) + [r for u in units for r in u.members]
        flat = [r for it in items for r in (getattr(it, "requests", None) or [it])]
        cache = getattr(sched, "cache", None)
        for g in [it for it in items if hasattr(it, "requests")]:
            g.abort(cache)
        if cache is not None:  # give the failed rows' KV blocks back to the pool
            for r in list(sched.running) + [u.leader for u in units]:
                cache.release(r.blocks)
        sched.groups.clear()
        if units:
            sched.prefilling.clear()
        for r in flat:
            if not r.finished:
                r.finish_reason = "error"
                r.error = f"internal error: {type(exc).__name__}: {exc}"
                events.append(TokenEvent(r, None, "", finish_reason="error"))
        sched.running.clear()
        sched.waiting.clear()
        for name in ("_state",):
            state = getattr(sched, name, None)
            if isinstance(state, dict):
                state.clear()
        if hasattr(sched, "_batch_key"):
            sched._batch_key = None
        return events

    def _drain_on_stop(self) -> None:
        with self._cv:
            inbox, self._inbox = self._inbox, []
            calls, self._calls = self._calls, []
        for _fn, fut, cost in calls:
            fut.cancel()
            self._calls_cost -= cost
        for requests, sink, _cost in inbox:
            for r in requests:
                self._sinks[r.id] = sink
            self.scheduler.add(requests)
        self._dispatch(self._fail_all(RuntimeError("the server is shutting down")))
