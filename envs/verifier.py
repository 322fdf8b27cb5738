"""Verifiers: turn an untrusted response and a reference answer into a reward.

``MathVerifier`` extracts the final answer (``extract.py``) and compares it with the reference
through math-verify (numbers, fractions, LaTeX, sets, intervals, percentages), in worker
processes with a hard time limit per answer (``pool.py``). Every failure -- nothing extracted,
an unparsable reference, a math-verify error, a timeout, a crashed worker -- scores 0 and is
counted; nothing raises into the training loop, and model output is never evaluated. Only a
verifier that cannot work raises: a broken pool refuses new answers, and a wait for answers
gives up past ``wait_deadline_s`` with an error saying how many were still pending.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from concurrent.futures import Future
from typing import Any, Sequence

from opefo_rllib.envs.extract import DEFAULT_ORDER, EXTRACTORS, extract_answer, normalize_number, sanitize_text
from opefo_rllib.envs.pool import WorkerPool, settle, wait_all

__all__ = ["VerifyResult", "MathVerifier", "math_equal"]

# Extra seconds a wait for answers allows on top of their time limits: workers start (and
# restart after a timeout) by importing sympy and math-verify, several seconds on a busy host.
WAIT_SLACK_S = 120.0


@dataclasses.dataclass
class VerifyResult:
    """Outcome of verifying one response.

    A verification that failed (not a wrong answer) says so: ``timed_out`` is True when the
    answer outlived the per-answer time limit, and ``error`` is "timeout: ...", "crash: ..." or
    "error: ..." for a timeout, a crashed worker, or an unparsable reference / broken pool.
    """

    reward: float
    correct: bool = False
    extracted: str | None = None
    format_ok: bool = False  # an answer was found where the extraction order looks for one
    timed_out: bool = False
    error: str | None = None
    extractor: str | None = None

    def as_info(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _failure(kind: str, message: str) -> dict:
    return {"reward": 0.0, "correct": False, "timed_out": kind == "timeout", "error": f"{kind}: {message}"}




def _parse(text: str, timeout_s: int):
    from math_verify import parse

    text = normalize_number(text)
    parsed = parse(f"${text}$", parsing_timeout=timeout_s)  # LaTeX first: sets, intervals, \frac
    if not parsed:
        parsed = parse(text, parsing_timeout=timeout_s)
    return parsed


def math_equal(answer: str, reference: str, timeout_s: int = 3, float_rounding: int = 6) -> bool:
    """True if math-verify finds ``answer`` equal to ``reference`` (call in a process's main thread)."""
    from math_verify import verify

    gold = _parse(reference, timeout_s)
    if not gold:
        raise ValueError(f"reference answer not parsable: {reference[:80]!r}")
    pred = _parse(answer, timeout_s)
    if not pred:
        return False
    return bool(verify(gold, pred, float_rounding=float_rounding, timeout_seconds=timeout_s))


def _verify_job(response: str, reference: str, order: tuple, max_chars: int, math_timeout_s: int,
                float_rounding: int) -> dict:
    """Runs in a worker process: extract, then compare with math-verify."""
    text = sanitize_text(response, max_chars)
    answer, extractor = extract_answer(text, order)
    if answer is None:
        return {"reward": 0.0, "correct": False, "format_ok": False}
    out = {"extracted": answer[:200], "extractor": extractor, "format_ok": True}
    try:
        correct = math_equal(answer, reference, math_timeout_s, float_rounding)
    except ValueError as e:
        return {**out, "reward": 0.0, "correct": False, "error": f"error: {e}"}
    return {**out, "reward": 1.0 if correct else 0.0, "correct": correct}


def _warm_worker() -> None:
    import math_verify  # noqa: F401  (import sympy and the grammar once, not on the first answer)


class MathVerifier:
    """Verify math answers against references with math-verify, in a bounded-time process pool.

    Args:
        extraction_order: extractors to try, in order ("boxed", "hash", "answer_is", "last_number").
        timeout_s: hard wall-time limit per answer; the worker is killed and replaced past it.
        num_workers: verification processes (they start on first use).
        max_response_chars: responses are cut to their last this-many characters before parsing.
        math_timeout_s: math-verify's own (signal-based) parse / compare timeouts, in seconds.
        float_rounding: digits math-verify rounds floats to before comparing.

    Example:
        >>> v = MathVerifier(num_workers=1)
        >>> [r.reward for r in v.verify_batch(["so \\\\boxed{\\\\frac{1}{2}}", "#### 3"], ["0.5", "4"])]
        [1.0, 0.0]
        >>> v.close()
    """

    def __init__(
        self,
        extraction_order: Sequence[str] = DEFAULT_ORDER,
        timeout_s: float = 10.0,
        num_workers: int = 2,
        max_response_chars: int = 20_000,
        math_timeout_s: int = 3,
        float_rounding: int = 6,
    ):
        unknown = [e for e in extraction_order if e not in EXTRACTORS]
        if unknown or not extraction_order:
            raise ValueError(f"extraction_order {list(extraction_order)!r}: unknown or empty; "
                             f"choose from {sorted(EXTRACTORS)}")
        if max_response_chars < 1:
            raise ValueError(f"max_response_chars must be >= 1, got {max_response_chars}")
        self.extraction_order = tuple(extraction_order)
        self.timeout_s, self.num_workers = float(timeout_s), int(num_workers)
        self.max_response_chars, self.math_timeout_s = int(max_response_chars), max(1, int(math_timeout_s))
        self.float_rounding = int(float_rounding)
        self._pool: WorkerPool | None = None
        self._pool_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._counts = dict.fromkeys(("verified", "correct", "no_answer", "timeouts", "errors"), 0)

    @property
    def pool(self) -> WorkerPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = WorkerPool(_verify_job, self.num_workers, self.timeout_s, _failure, init=_warm_worker)
            return self._pool

    def verify_async(self, response: str, reference: str) -> Future:
        """One answer; the Future resolves to a VerifyResult (never raises)."""
        args = (sanitize_text(response, self.max_response_chars), sanitize_text(reference), self.extraction_order,
                self.max_response_chars, self.math_timeout_s, self.float_rounding)
        raw = self.pool.submit(*args)
        out: Future = Future()
        out.add_done_callback(lambda o: raw.cancel() if o.cancelled() else None)  # not verified if still queued

        def done(f: Future) -> None:
            if f.cancelled() or out.done():
                return
            if f.exception() is not None:  # only if the pool's failure handler itself failed
                settle(out, error=f.exception())
                return
            result = VerifyResult(**f.result())
            with self._counts_lock:
                self._counts["verified"] += 1
                self._counts["correct"] += result.correct
                self._counts["no_answer"] += not result.format_ok and result.error is None
                self._counts["timeouts"] += result.timed_out
                self._counts["errors"] += result.error is not None and not result.timed_out
            settle(out, result)

        raw.add_done_callback(done)
        return out

    def wait_deadline_s(self, num_answers: int) -> float:
        """How long waiting for ``num_answers`` answers may take before it is an error: each waits
        its turn on a worker and may use its time limit twice (a timeout, then a restart)."""
        rounds = math.ceil(max(1, num_answers) / self.num_workers)
        return 2 * self.timeout_s * rounds + WAIT_SLACK_S

    def _wait(self, futures: list[Future], what: str) -> list[VerifyResult]:
        return wait_all(futures, self.wait_deadline_s(len(futures)),
                        f"MathVerifier.{what} ({self.num_workers} workers, timeout_s={self.timeout_s:g}): answers")

    def verify_batch_async(self, responses: Sequence[str], references: Sequence[str]) -> list[Future]:
        """Submit many answers at once; returns one Future[VerifyResult] per answer."""
        if len(responses) != len(references):
            raise ValueError(f"verify_batch: {len(responses)} responses but {len(references)} references")
        return [self.verify_async(r, ref) for r, ref in zip(responses, references)]

    def verify_batch(self, responses: Sequence[str], references: Sequence[str]) -> list[VerifyResult]:
        """Verify many answers in parallel and wait for all of them."""
        return self._wait(self.verify_batch_async(responses, references), "verify_batch")

    def verify(self, response: str, reference: str) -> VerifyResult:
        return self._wait([self.verify_async(response, reference)], "verify")[0]

    def stats(self) -> dict[str, int]:
        """Outcome counters (verified, correct, no_answer, timeouts, errors) and the pool's
        (pool_submitted, pool_completed, pool_timeouts, pool_crashes, pool_errors, pool_restarts)."""
        with self._counts_lock:
            out = dict(self._counts)
        pool = self._pool
        if pool is not None:
            out.update({f"pool_{k}": v for k, v in pool.stats().items()})
        return out

    def close(self) -> None:
        """Stop the worker processes; answers still queued resolve as errors (reward 0)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __getstate__(self):  # a verifier travels (e.g. to a Ray actor) without its processes
        state = self.__dict__.copy()
        state["_pool"], state["_pool_lock"], state["_counts_lock"] = None, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool_lock, self._counts_lock = threading.Lock(), threading.Lock()


_shared: MathVerifier | None = None
_shared_lock = threading.Lock()


def shared_math_verifier() -> MathVerifier:
    """A process-wide default MathVerifier, so many envs share one pool of workers."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MathVerifier()
        return _shared
