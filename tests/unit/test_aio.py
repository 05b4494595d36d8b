"""``within``: a timeout that never swallows the caller's cancellation."""

from __future__ import annotations

import asyncio

import pytest

from halb.aio import cancel_and_wait, within

pytestmark = pytest.mark.unit


def test_cancel_arriving_as_the_call_completes_still_cancels() -> None:
    # The race that made asyncio.wait_for (3.11) return the result instead: the awaited
    # future completes in the same loop iteration in which the caller is cancelled.
    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(within(fut, 5.0))
        await asyncio.sleep(0)
        fut.set_result(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_times_out_and_returns_results() -> None:
    async def main() -> None:
        assert await within(asyncio.sleep(0, "ok"), 1.0) == "ok"
        with pytest.raises(TimeoutError):
            await within(asyncio.sleep(1.0), 0.01)

    asyncio.run(main())


def test_cancel_and_wait_ends_the_task_and_logs_only_its_own_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    log = logging.getLogger("halb.test.aio")

    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            raise RuntimeError("cleanup broke")

    async def main() -> None:
        quiet = asyncio.create_task(asyncio.sleep(10))
        loud = asyncio.create_task(fails_when_cancelled())
        await asyncio.sleep(0)
        await cancel_and_wait(quiet, log, "quiet %s", "task")
        await cancel_and_wait(loud, log, "loud %s", "task")
        await cancel_and_wait(None, log, "nothing")
        assert quiet.cancelled() and loud.done()

    with caplog.at_level(logging.ERROR, logger="halb.test.aio"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == ["loud task"]


def test_cancel_and_wait_again_ends_a_loop_that_swallows_one_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry loop that turns one cancellation into a retry (as a loop around a failing
    grpc.aio call can) ends with ``again``; the warning says it happened."""
    import logging

    log = logging.getLogger("halb.test.aio")
    retries = 0

    async def swallows_once() -> None:
        nonlocal retries
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if retries:
                    raise
                retries += 1  # the first one is "lost" in a failed call: retry

    async def main() -> None:
        nonlocal retries
        task = asyncio.create_task(swallows_once(), name="retry-loop")
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(task, log, "loop", again=0.05), 2.0)
        assert task.cancelled() and retries == 1
        # Without ``again`` the same loop would still be running after a plain cancel.
        retries = 0
        stuck = asyncio.create_task(swallows_once())
        await asyncio.sleep(0)
        stuck.cancel()
        await asyncio.sleep(0.05)
        assert not stuck.done()
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck

    with caplog.at_level(logging.WARNING, logger="halb.test.aio"):
        asyncio.run(main())
    assert "retry-loop survived a cancellation" in caplog.text
