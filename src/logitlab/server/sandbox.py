"""Bounded work for the server: a request's grammar is compiled, and the model's chat template rendered,
in worker processes that each run under a memory cap (``RLIMIT_AS``) and a wall-clock deadline. A job
past its deadline is killed with its process, which is replaced on the next job.

Why processes, not threads or an in-process budget (measured on the 2-core dev machine, SmolLM2's
49k-token vocabulary): xgrammar compiled ``(a|b)*`` repeated 100 times (600 bytes) in 4 s, 500 times
(3 KB) in 166 s, and 20,000 times took the server from 3.3 to 12 GB; no xgrammar call can be interrupted,
so a thread with a deadline would keep a core and the memory, and keep the interpreter from exiting.
Under ``RLIMIT_AS`` the same compile fails in about a second with ``std::bad_alloc``, in the worker only.
A Jinja sandbox with a loop budget would not bound one C-level operation (a huge string repeat, a big
integer power); a killed process bounds everything. The costs: a worker starts once (the grammar
worker imports xgrammar, hence torch: ~4 s, ~300 MB; the template worker ~0.3 s, ~60 MB) and each job
crosses a socket (well under a millisecond for a chat render).

    pool = WorkerPool("grammar", "grammar_init", lambda: [info_json], memory_bytes=1 << 30, timeout_s=10)
    future = pool.submit("grammar_compile", "regex", "[0-9]+", False, 1 << 28)   # concurrent.futures.Future
    pool.close()

Jobs are named (``JOBS``), arguments and results are JSON: the parent never runs code a worker sends.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path


class SandboxError(Exception):
    """A job did not produce a result; ``kind`` says why: "timeout", "memory", "crash", "busy", "closed",
    or "failed" (the job raised: ``message`` is its error, ``field`` the request field it names if any)."""

    def __init__(self, kind: str, message: str = "", field: str | None = None):
        super().__init__(message or kind)
        self.kind, self.message, self.field = kind, message, field


# ---- the worker side -------------------------------------------------------------------------------

def _grammar_init(state: dict, info_json: str, threads: int) -> None:
    import xgrammar

    info = xgrammar.TokenizerInfo.deserialize_json(info_json)
    state["info"] = info
    state["compiler"] = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)


def _grammar_compile(state: dict, kind: str, value, any_whitespace: bool, max_bytes: int) -> str:
    """The compiled grammar, serialized; refused when xgrammar counts it above ``max_bytes``."""
    from ..decoding.constraints import ConstraintSpec, compile_with

    spec = ConstraintSpec(kind, tuple(value) if kind == "choice" else value)
    compiled = compile_with(state["compiler"], spec, any_whitespace)
    if compiled.memory_size_bytes > max_bytes:
        raise _TooLarge(compiled.memory_size_bytes)
    return compiled.serialize_json()


def _template_init(state: dict, config: dict) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import Tokenizer

    backend = HFTokenizer.from_str(config.pop("backend"))
    state["tokenizer"] = Tokenizer(backend, **config)


def _template_render(state: dict, messages: list, add_generation_prompt: bool, add_special_tokens: bool,
                     max_tokens: int, variables: dict | None = None) -> list[int]:
    """The conversation's token ids (``Tokenizer.encode_chat``), refused past ``max_tokens``. ``variables``:
    more template variables (``tools``: server/tools.py)."""
    ids = state["tokenizer"].encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                         add_special_tokens=add_special_tokens, **(variables or {}))
    if len(ids) > max_tokens:
        raise _TooLarge(len(ids))
    return ids


class _TooLarge(Exception):
    pass


JOBS: dict[str, Callable] = {"grammar_init": _grammar_init, "grammar_compile": _grammar_compile,
                             "template_init": _template_init, "template_render": _template_render}


def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cap_memory(budget: int) -> None:
    """RLIMIT_AS = the address space in use now (interpreter, imports, the job's state) + ``budget``."""
    import resource

    now = _vm_size()
    if now is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = now + budget
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft == resource.RLIM_INFINITY or cap < soft:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the server dies (a worker stuck in a compile never reads the EOF)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _reply(conn: Connection, msg: dict) -> None:
    conn.send_bytes(json.dumps(msg).encode())


def worker_main(fd: int, budget: int, parent: int) -> None:
    """Serve jobs on the socket ``fd`` until it closes. The first job initialises (imports, state); the
    memory cap is set right after it, so it bounds what the requests' jobs allocate."""
    from ..sampling import ParamError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole process group: the server decides
    _die_with_parent()
    if os.getppid() != parent:
        return
    conn = Connection(fd)
    state: dict = {}
    first = True
    while True:
        try:
            msg = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            result = JOBS[msg["job"]](state, *msg["args"])
        except MemoryError:
            _reply(conn, {"error": "memory"})
            return  # whatever ran out of memory may have left the state half-built: start afresh
        except _TooLarge as e:
            _reply(conn, {"error": "too_large", "size": e.args[0]})
        except ParamError as e:
            _reply(conn, {"error": "failed", "field": e.field, "message": e.reason})
        except Exception as e:  # noqa: BLE001 - the job's own error (a template's raise_exception, ...)
            text = str(e).strip() or type(e).__name__
            _reply(conn, {"error": "failed", "field": None, "message": text[:500]})
        else:
            _reply(conn, {"ok": result})
        if first:
            first = False
            _cap_memory(budget)


# ---- the server side -------------------------------------------------------------------------------

class _Worker:
    def __init__(self, budget: int):
        parent_sock, child_sock = socket.socketpair()
        src = str(Path(__file__).resolve().parents[2])  # the directory holding the logitlab package
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
        code = "import sys; from logitlab.server.sandbox import worker_main; worker_main(*map(int, sys.argv[1:]))"
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code, str(child_sock.fileno()), str(budget),
                                          str(os.getpid())],
                                         pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL, env=env)
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())

    def call(self, job: str, args: list, timeout: float):
        try:
            self.conn.send_bytes(json.dumps({"job": job, "args": args}).encode())
            ready = self.conn.poll(timeout)
        except OSError:
            ready = True  # the worker is gone: recv says so
        if not ready:
            self.kill()
            raise SandboxError("timeout")
        try:
            reply = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            code = self.kill()
            raise SandboxError("crash", f"the worker process ended (exit status {code})") from None
        if "ok" in reply:
            return reply["ok"]
        kind = reply["error"]
        if kind == "memory":
            self.kill()  # it exits by itself: reap it
        if kind == "too_large":
            raise SandboxError(kind, str(reply["size"]))
        raise SandboxError(kind, reply.get("message", ""), reply.get("field"))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self.conn.close()
        return code


class WorkerPool:
    """Up to ``size`` worker processes serving named jobs, each under ``memory_bytes`` of address space
    beyond its initialised state and ``timeout_s`` of wall-clock time. Workers start on first use, with
    the job ``init_job(*init_args())``. At most ``max_pending`` jobs wait or run; more are "busy"."""

    def __init__(self, name: str, init_job: str, init_args: Callable[[], list], size: int = 1,
                 memory_bytes: int = 1 << 30, timeout_s: float = 10.0, start_timeout_s: float = 120.0,
                 max_pending: int = 64):
        self.name, self.init_job, self._init_args = name, init_job, init_args
        self.size, self.memory_bytes, self.timeout_s = size, memory_bytes, timeout_s
        self.start_timeout_s, self.max_pending = start_timeout_s, max_pending
        self._lock = threading.Lock()
        self._args: list | None = None
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._pending = 0
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix=f"logitlab-{name}")
        self.started = 0  # workers started so far (a test can see restarts)

    def submit(self, job: str, *args) -> concurrent.futures.Future:
        with self._lock:
            if self._closed:
                raise SandboxError("closed", "the server is shutting down")
            if self._pending >= self.max_pending:
                raise SandboxError("busy", f"{self._pending} {self.name} jobs are waiting")
            self._pending += 1
        try:
            return self._executor.submit(self._run, job, list(args))
        except RuntimeError:  # closed meanwhile
            with self._lock:
                self._pending -= 1
            raise SandboxError("closed", "the server is shutting down") from None

    def run(self, job: str, *args):
        """``submit`` and wait (for callers that are not on an event loop)."""
        return self.submit(job, *args).result()

    def _run(self, job: str, args: list):
        try:
            worker = self._take()
            try:
                result = worker.call(job, args, self.timeout_s)
            except BaseException:
                if not worker.alive:
                    self._drop(worker)
                else:
                    self._give(worker)
                raise
            self._give(worker)
            return result
        finally:
            with self._lock:
                self._pending -= 1

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise SandboxError("closed", "the server is shutting down")
            while self._idle:
                w = self._idle.pop()
                if w.alive:
                    return w
                self._all.discard(w)
            if self._args is None:
                self._args = list(self._init_args())
            w = _Worker(self.memory_bytes)
            self._all.add(w)
            self.started += 1
        try:
            w.call(self.init_job, self._args, self.start_timeout_s)
        except BaseException:
            self._drop(w)
            raise
        return w

    def _give(self, w: _Worker) -> None:
        with self._lock:
            if self._closed:
                w.kill()
                self._all.discard(w)
            else:
                self._idle.append(w)

    def _drop(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            self._all.discard(w)

    def close(self) -> None:
        """Kill every worker (a job running is answered "closed" or "crash") and refuse new jobs."""
        with self._lock:
            self._closed = True
            workers, self._all, self._idle = list(self._all), set(), []
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for w in workers:
            w.kill()


# ---- the server's bounded work, for one engine --------------------------------------------------------

# A grammar refused for time or memory is refused again at once for this long (a client repeating a hostile
# grammar costs nothing); after it, it is tried again (it may have timed out only because the machine was busy).
REFUSAL_TTL_S = 300.0

def _template_config(tok) -> dict:
    """What a worker needs to rebuild ``tok`` (a ``logitlab.tokenizer.Tokenizer``) for ``encode_chat``."""
    return {"backend": tok.backend.to_str(), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "add_bos": tok.add_bos, "add_eos": tok.add_eos, "chat_template": tok.chat_template,
            "pad_token_id": tok.pad_token_id, "unk_token_id": tok.unk_token_id}


class EngineSandbox:
    """An engine's grammar compilation (with a bounded cache of compiled grammars, and of recent refusals so a
    repeated hostile grammar costs nothing) and chat-template rendering, each in its own ``WorkerPool``.
    ``limits``: a ``guards.Limits``. ``max_prompt_tokens``: a rendered conversation past this is refused."""

    def __init__(self, engine, limits, max_prompt_tokens: int, workers: int = 2):
        from collections import OrderedDict

        from ..decoding.constraints import GrammarCache

        self.engine, self.limits, self.max_prompt_tokens = engine, limits, max_prompt_tokens
        self.cache = GrammarCache(limits.grammar_cache_mb << 20)
        self._refused: OrderedDict = OrderedDict()  # grammar key -> (the ParamError it got: timeout, memory; when)
        self._inflight: dict = {}  # grammar key -> asyncio.Future: one compile for concurrent requests
        self._info = None
        self.grammars = WorkerPool("grammar", "grammar_init", lambda: [self.info().serialize_json(), 1],
                                   size=workers, memory_bytes=limits.grammar_memory_mb << 20,
                                   timeout_s=limits.grammar_timeout_s)
        tok = engine.tokenizer
        self.templates = None
        if hasattr(tok, "backend") and hasattr(tok, "encode_chat"):
            self.templates = WorkerPool("template", "template_init", lambda: [_template_config(tok)],
                                        size=workers, memory_bytes=limits.template_memory_mb << 20,
                                        timeout_s=limits.template_timeout_s)

    def info(self):
        if self._info is None:
            from ..decoding.constraints import engine_tokenizer_info

            self._info = engine_tokenizer_info(self.engine)
        return self._info

    def close(self) -> None:
        self.grammars.close()
        if self.templates is not None:
            self.templates.close()

    # ---- grammars --------------------------------------------------------------------------------
    async def compile(self, spec):
        """``spec`` compiled (``constraints.Constraint``): from the cache, or in a grammar worker. A grammar
        that does not compile, or not within the time and memory budget, is a ParamError (the constraint's
        field); SandboxError "busy" / "closed" when the pool cannot take it."""
        import asyncio

        from ..decoding.constraints import grammar_key

        info = self._info or await asyncio.to_thread(self.info)
        key = grammar_key(spec, info)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        refused = self._refused.get(key)
        if refused is not None and time.monotonic() - refused[1] < REFUSAL_TTL_S:
            raise refused[0]
        fut = self._inflight.get(key)
        if fut is None:
            fut = self._inflight[key] = asyncio.ensure_future(self._compile(spec, info, key))

            def done(f, key=key):
                self._inflight.pop(key, None)
                if not f.cancelled():
                    f.exception()  # looked at: a refusal whose requests all left is not "never retrieved"

            fut.add_done_callback(done)
        return await asyncio.shield(fut)

    async def _compile(self, spec, info, key):
        import asyncio

        from ..decoding.constraints import _FIELD, Constraint
        from ..sampling import ParamError

        value = list(spec.value) if spec.kind == "choice" else spec.value
        field, lim = _FIELD[spec.kind], self.limits
        try:
            data = await asyncio.wrap_future(self.grammars.submit("grammar_compile", spec.kind, value, False,
                                                                  self.cache.max_bytes))
        except SandboxError as e:
            if e.kind == "failed":
                raise ParamError(e.field or field, e.message) from None
            if e.kind == "timeout":
                err = ParamError(field, f"did not compile within {lim.grammar_timeout_s:g} s (this server's "
                                        "--grammar-timeout)")
            elif e.kind in ("memory", "crash"):
                err = ParamError(field, f"needs more than {lim.grammar_memory_mb} MiB to compile (this server's "
                                        "--grammar-memory-mb)")
            elif e.kind == "too_large":
                err = ParamError(field, f"compiles to {int(e.message) / 2**20:.1f} MiB; this server keeps at most "
                                        f"{lim.grammar_cache_mb} MiB of compiled grammars (--grammar-cache-mb)")
            else:
                raise
            self._refused[key] = (err, time.monotonic())
            self._refused.move_to_end(key)
            while len(self._refused) > 256:
                self._refused.popitem(last=False)
            raise err from None
        constraint = await asyncio.to_thread(Constraint.from_serialized, data, info, spec)
        self.cache.put(key, constraint)
        return constraint

    # ---- chat templates ----------------------------------------------------------------------------
    async def chat_ids(self, messages: list[dict], add_special_tokens: bool = True,
                       variables: dict | None = None) -> list[int]:
        """The conversation's prompt ids (``Tokenizer.encode_chat`` with the generation prompt), rendered in a
        template worker. A template that fails, or runs past the budget, is a ParamError on ``messages``."""
        import asyncio

        from ..sampling import ParamError

        if self.templates is None:  # a tokenizer that cannot be sent to a worker: render here, off the loop
            try:
                return await asyncio.to_thread(self.engine.tokenizer.encode_chat, messages,
                                               add_special_tokens=add_special_tokens, **(variables or {}))
            except Exception as e:  # noqa: BLE001 - the template's own error
                raise ParamError("messages", f"the chat template cannot render them: {e}") from None
        lim = self.limits
        try:
            return await asyncio.wrap_future(self.templates.submit("template_render", messages, True,
                                                                   add_special_tokens, self.max_prompt_tokens,
                                                                   variables or {}))
        except SandboxError as e:
            if e.kind == "failed":
                raise ParamError("messages", f"the chat template cannot render them: {e.message}") from None
            if e.kind == "timeout":
                raise ParamError("messages", f"the chat template did not finish within {lim.template_timeout_s:g} s "
                                             "(this server's --template-timeout)") from None
            if e.kind in ("memory", "crash"):
                raise ParamError("messages", f"the chat template needs more than {lim.template_memory_mb} MiB to "
                                             "render them") from None
            if e.kind == "too_large":
                raise ParamError("messages", f"render to {e.message} tokens; the context holds "
                                             f"{self.engine.max_len}") from None
            raise
