"""MathVerifier (math-verify in a bounded-time worker pool), answer extraction, WorkerPool."""

import time

import pool_jobs
import pytest

from opefo_rllib.envs import MathVerifier, extract_answer
from opefo_rllib.envs.pool import WorkerPool


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(num_workers=2, timeout_s=8.0, math_timeout_s=2)
    yield v
    v.close()


# (response, reference): each must score 1.
EQUIVALENT = [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac12"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
    ("so we get \\boxed{3/4}", "\\frac{3}{4}"),
    ("\\boxed{025}", "25"),                      # AIME leading zeros
    ("\\boxed{25}", "025"),
    ("\\boxed{1,000}", "1000"),                  # thousands separators
    ("#### 1,080", "1080"),
    ("Natalia sold 72 clips.\n#### 72", "72"),   # GSM8K
    ("The answer is 18.", "18"),
    ("The final answer is $\\frac{\\sqrt{2}}{2}$.", "\\frac{\\sqrt2}{2}"),
    ("answer: -7", "-7"),
    ("After all that we have 3 apples and 12 pears, so 15", "15"),  # last number
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{2\\pi}", "2\\pi"),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}"),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}"),   # sets
    ("\\boxed{(1, 2]}", "(1,2]"),                # intervals
    ("\\boxed{[-1, \\infty)}", "[-1,\\infty)"),
    ("\\boxed{(-\\infty, 0) \\cup (1, \\infty)}", "(-\\infty,0)\\cup(1,\\infty)"),
    ("\\boxed{50\\%}", "50"),                     # percentages
    ("\\boxed{50\\%}", "0.5"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\pi/2)"),  # tuples
    ("\\boxed{x = 3}", "3"),
    ("\\boxed{10^{\\circ}}", "10"),
    ("\\boxed{2.7778e-6}", "2.7778\\times10^{-6}"),  # scientific notation
    ("\\boxed{4.5e33}", "4.5\\times 10^{33}"),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2"),         # symbolic equality
    ("\\boxed{\\frac{1}{2n+2}}", "\\frac{1}{2 n+2}"),
    ("\\boxed{-\\frac{1}{3}}", "-1/3"),
    ("\\boxed{1.25}", "\\frac{5}{4}"),
    ("\\boxed{3.0}", "3"),
    ("\\boxed{\\text{(B)}}", "B"),
    ("\\boxed{\\frac{9}{2}}", "4.5"),
    ("\\fbox{12}", "12"),
    ("We find $\\boxed{\\boxed{7}}$", "7"),
    ("\\boxed{\\$18}", "18"),
]

# (response, reference): each must score 0.
WRONG = [
    ("\\boxed{41}", "42"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("\\boxed{(1, 2)}", "(1,2]"),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}"),
    ("#### 1,081", "1080"),
    ("The answer is 19.", "18"),
    ("\\boxed{-25}", "25"),
    ("\\boxed{2\\sqrt{3}}", "2\\sqrt{2}"),
    ("\\boxed{x^2 + 1}", "(x+1)^2"),
    ("no number here at all", "5"),
]


def test_at_least_forty_hand_picked_cases():
    assert len(EQUIVALENT) + len(WRONG) >= 40


def test_equivalent_forms_score_one(verifier):
    results = verifier.verify_batch([r for r, _ in EQUIVALENT], [a for _, a in EQUIVALENT])
    failed = [(case, res) for case, res in zip(EQUIVALENT, results) if res.reward != 1.0]
    assert not failed, failed


def test_wrong_answers_score_zero(verifier):
    results = verifier.verify_batch([r for r, _ in WRONG], [a for _, a in WRONG])
    failed = [(case, res) for case, res in zip(WRONG, results) if res.reward != 0.0]
    assert not failed, failed
    assert results[-1].format_ok is False and results[-1].extracted is None


HOSTILE = {
    "nested_frac": "\\boxed{" + "\\frac{" * 10000 + "1" + "}{2}" * 10000 + "}",
    "one_megabyte": "x" * 1_000_000,
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "lone_surrogates": "\ud800 answer \udfff \\boxed{\ud800}",
    "empty": "",
    "open_boxed": "\\boxed{",
}


def test_hostile_answers_score_zero_in_time_and_leave_the_pool_working():
    v = MathVerifier(num_workers=2, timeout_s=6.0, math_timeout_s=2)
    try:
        start = time.monotonic()
        results = v.verify_batch(list(HOSTILE.values()), ["1"] * len(HOSTILE))
        elapsed = time.monotonic() - start
        for name, res in zip(HOSTILE, results):
            assert res.reward == 0.0, (name, res)
        # Each answer is bounded by the 6 s hard limit; two workers share the six answers.
        assert elapsed < 6.0 * len(HOSTILE) / 2 + 10
        after = v.verify_batch(["\\boxed{2}", "\\boxed{3}"], ["2", "2"])
        assert [r.reward for r in after] == [1.0, 0.0]
        stats = v.stats()
        assert stats["verified"] == len(HOSTILE) + 2
    finally:
        v.close()


def test_long_responses_are_truncated_keeping_the_end():
    v = MathVerifier(num_workers=1, max_response_chars=100)
    try:
        res = v.verify("\\boxed{1} " + "filler " * 1000 + " so \\boxed{7}", "7")
        assert res.reward == 1.0
        res = v.verify("\\boxed{7} " + "filler " * 1000, "7")  # the early answer was cut away
        assert res.reward == 0.0
    finally:
        v.close()


def test_unparsable_reference_scores_zero_with_an_error(verifier):
    res = verifier.verify("\\boxed{1}", "\\")
    assert res.reward == 0.0 and res.error and "reference" in res.error


def test_verify_batch_async_overlaps_and_keeps_order(verifier):
    futures = verifier.verify_batch_async([f"\\boxed{{{i}}}" for i in range(20)], [str(i) for i in range(20)])
    assert [f.result(timeout=60).reward for f in futures] == [1.0] * 20


def test_extraction_order_is_configurable():
    text = "#### 5\nThe answer is 6. \\boxed{7} and 8"
    assert extract_answer(text) == ("7", "boxed")
    assert extract_answer(text, ("hash", "boxed")) == ("5", "hash")
    assert extract_answer(text, ("answer_is",))[0].startswith("6")
    assert extract_answer(text, ("last_number",)) == ("8", "last_number")
    with pytest.raises(ValueError, match="unknown answer extractor"):
        extract_answer(text, ("nope",))
    with pytest.raises(ValueError, match="extraction_order"):
        MathVerifier(extraction_order=("nope",))


def test_nothing_is_evaluated():
    # A response that would have side effects if eval'ed is just text that scores 0.
    v = MathVerifier(num_workers=1)
    try:
        res = v.verify("\\boxed{__import__('os').system('touch /tmp/opefo_pwned')}", "0")
        assert res.reward == 0.0
    finally:
        v.close()
    import os

    assert not os.path.exists("/tmp/opefo_pwned")


# --------------------------------------------------------------------------- WorkerPool


def test_pool_kills_and_replaces_a_hung_worker():
    with WorkerPool(pool_jobs.sleep_then, num_workers=1, timeout_s=1.0, on_failure=pool_jobs.failure) as pool:
        start = time.monotonic()
        hung = pool.submit(60, "never")
        ok = pool.submit(0, "after")
        assert hung.result(timeout=30) == {"failed": "timeout", "message": "no result within 1 s"}
        assert ok.result(timeout=30) == "after"
        assert time.monotonic() - start < 20
        stats = pool.stats()
        assert stats["timeouts"] == 1 and stats["restarts"] == 1 and stats["completed"] == 1


def test_pool_survives_a_crashing_worker():
    with WorkerPool(pool_jobs.crash, num_workers=2, timeout_s=10.0, on_failure=pool_jobs.failure) as pool:
        results = [f.result(timeout=60) for f in pool.map([(3,), (4,)])]
        assert {r["failed"] for r in results} == {"crash"}
        assert pool.stats()["crashes"] == 2
    with WorkerPool(pool_jobs.echo, num_workers=1, on_failure=pool_jobs.failure) as pool:
        assert pool.submit("fine").result(timeout=30) == "fine"


def test_pool_turns_exceptions_into_failure_results():
    with WorkerPool(pool_jobs.raise_error, num_workers=1, on_failure=pool_jobs.failure) as pool:
        res = pool.submit("boom").result(timeout=30)
        assert res["failed"] == "error" and "RuntimeError: boom" in res["message"]


def test_pool_uses_all_its_workers(tmp_path):
    # Each job checks in and waits for a second worker to: a job finishes "met" only if two
    # workers ran at once (no wall-clock bound, so a busy machine cannot fail it). Four jobs, as
    # each worker may hold two (jobs_in_flight).
    with WorkerPool(pool_jobs.meet, num_workers=2, timeout_s=60.0, on_failure=pool_jobs.failure) as pool:
        results = [f.result(timeout=90) for f in pool.map([(str(tmp_path), 2, 30.0)] * 4)]
    assert [met for _, met in results] == [True] * 4, results
    assert len({pid for pid, _ in results}) == 2


def test_pool_refuses_functions_it_cannot_import_by_name():
    with pytest.raises(ValueError, match="module-level function"):
        WorkerPool(lambda: 1)


def test_close_with_answers_in_flight_resolves_them_without_hanging():
    v = MathVerifier(num_workers=1)
    v.verify("\\boxed{1}", "1")
    futures = v.verify_batch_async(["\\boxed{2}"] * 5, ["2"] * 5)
    start = time.monotonic()
    v.close()
    results = [f.result(timeout=20) for f in futures]
    assert time.monotonic() - start < 20
    assert all(r.reward in (0.0, 1.0) for r in results)
    assert all(r.error == "error: pool closed" for r in results if r.reward == 0.0)
