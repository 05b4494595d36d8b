"""Backend health in the agent: checks on every node, one published view per cluster.

Every node runs every check (so a promoted standby has warm states), but only the
active node of the cluster's first VIP group publishes the view; every node (the
publisher too, through the same watch) programs its dataplane from the published view,
so all nodes build identical rings from identical inputs. A failure in here is logged
and retried: health never takes VIP ownership down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from halb.aio import within
from halb.checks.factory import targets_from_config
from halb.checks.publish import (
    HealthKeys,
    HealthPublisher,
    LeaderGuard,
    read_view,
    run_publisher,
    watch_views,
)
from halb.checks.scheduler import CheckScheduler
from halb.checks.state import BackendHealth, Damping
from halb.checks.view import HealthView, ViewError, effective_services, states_from_view
from halb.config import ClusterConfig
from halb.etcd import EtcdClient, EtcdError
from halb.ha.machine import Leader
from halb.ha.runtime import SyncRoles
from halb.model import Service, Term

__all__ = ["HealthRole", "TermRoles"]

log = logging.getLogger(__name__)


class HealthRole:
    def __init__(
        self,
        cfg: ClusterConfig,
        node: str,
        client: EtcdClient,
        on_view: Callable[[HealthView], Awaitable[None]],
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.client = client
        self.keys = HealthKeys.from_config(cfg)
        self.on_view = on_view
        self.view: HealthView | None = None
        self.scheduler = self._scheduler(cfg)
        self._sched_task: asyncio.Task[None] | None = None
        # Set when a reload replaced the scheduler, so the publisher follows the new one.
        self._replaced = asyncio.Event()

    @staticmethod
    def _scheduler(
        cfg: ClusterConfig, states: Mapping[str, BackendHealth] | None = None
    ) -> CheckScheduler:
        d = cfg.health.damping
        return CheckScheduler(
            targets_from_config(cfg),
            damping=Damping(d.max_changes, d.window, d.hold),
            initial_states=states,
        )

    def services(self, cfg: ClusterConfig | None = None) -> list[Service]:
        """What the dataplane must hold: the config's services under the current view."""
        return effective_services((cfg or self.cfg).services(), self.view)

    async def seed(self) -> None:
        """Start from the published view (a node that takes over starts from it)."""
        try:
            view = await within(read_view(self.client, self.keys), 2.0)
        except (TimeoutError, EtcdError, OSError, ViewError) as exc:
            log.warning("no published health view to start from: %s", exc)
            return
        if view is not None:
            self.view = view
            self.scheduler = self._scheduler(self.cfg, states_from_view(view))
            log.info("starting from published health view r%d", view.revision)

    async def run(self) -> None:
        """Every node: run the checks and apply every published view."""
        self._start_scheduler()
        try:
            async for view in watch_views(self.client, self.keys):
                self.view = view
                try:
                    await self.on_view(view)
                except Exception:
                    log.exception("applying health view r%d failed", view.revision)
        finally:
            await self._stop_scheduler()

    def _start_scheduler(self) -> None:
        self._sched_task = asyncio.create_task(self._run_scheduler(), name="health-checks")

    async def _run_scheduler(self) -> None:
        try:
            await self.scheduler.run()
        except Exception:
            log.exception("health check scheduler failed; checks stopped until reload")

    async def _stop_scheduler(self) -> None:
        if self._sched_task is not None:
            self._sched_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sched_task
            self._sched_task = None

    async def reconfigure(self, cfg: ClusterConfig) -> None:
        """A config reload: new targets, keeping the states of backends that remain."""
        self.cfg = cfg
        old = self.scheduler.states()
        await self._stop_scheduler()
        self.scheduler = self._scheduler(cfg, old)
        self._start_scheduler()
        self._replaced.set()

    async def publish(self, term: Term, leader_key: bytes) -> None:
        """The active node of the publishing group, for the length of its term. Follows
        the scheduler across config reloads (a reload replaces it)."""
        pub = HealthPublisher(
            self.client,
            self.keys,
            node=self.node,
            term=str(term),
            guard=LeaderGuard(leader_key, term.revision),
        )
        while True:
            self._replaced.clear()
            run = asyncio.create_task(
                run_publisher(pub, lambda: self.cfg.services(), self.scheduler)
            )
            replaced = asyncio.create_task(self._replaced.wait())
            try:
                await asyncio.wait({run, replaced}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                replaced.cancel()
                if not run.done():
                    run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await replaced
                try:
                    await run
                except asyncio.CancelledError:
                    if not self._replaced.is_set():
                        raise
                except Exception:
                    log.exception("health view publisher for term %s failed", term)
                    return
            if not self._replaced.is_set():
                return  # the guard failed: the term is over


class TermRoles:
    """SyncRoles that also publish the health view while the term lasts."""

    def __init__(self, sync: SyncRoles | None, health: HealthRole, leader_key: bytes) -> None:
        self.sync = sync
        self.health = health
        self.leader_key = leader_key

    async def serve(self, group: str, term: Term) -> None:
        async with asyncio.TaskGroup() as tg:
            if self.sync is not None:
                tg.create_task(self.sync.serve(group, term))
            tg.create_task(self.health.publish(term, self.leader_key))

    async def follow(self, group: str, leader: Leader) -> None:
        if self.sync is not None:
            await self.sync.follow(group, leader)
        else:
            await asyncio.get_running_loop().create_future()  # until cancelled

    def caught_up(self, group: str, leader: Leader) -> bool:
        return self.sync is None or self.sync.caught_up(group, leader)
