"""The agent's FlowSync roles, per VIP group: serving the group while this node holds
its term, following it while another node does (halb.ha.runtime.SyncRoles).

serve(group, term): that group's feed on the node's one FlowSyncServer (on its
sync_address, started once), fed by the dataplane's flow source (snapshots on demand,
deltas pushed as they are learned). follow(group, leader): a FlowSyncClient for that
group against the leader's sync_address that writes into this node's dataplane; on
cancellation it returns only once the write in progress has landed (state before
address: the runtime awaits it before adding VIPs).

Neither role ever raises into the term: a sync failure is logged and retried, because
losing flow sync must not take VIP ownership down with it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from halb.aio import cancel_and_wait
from halb.config import ClusterConfig
from halb.dataplane.base import Dataplane, FlowSource
from halb.flows import records
from halb.flows.records import FlowBatch
from halb.ha.machine import Leader
from halb.ha.runtime import SyncRoles
from halb.model import Term
from halb.sync.client import ClientOptions, FlowSyncClient
from halb.sync.feed import FlowFeed
from halb.sync.promise import PromiseDesk
from halb.sync.server import FlowSyncServer, ServerOptions, ServerStats
from halb.sync.tls import InsecureNotAllowed, SyncSecurity

__all__ = [
    "AgentSyncRoles",
    "SyncFactory",
    "SyncSetupError",
    "make_sync_roles",
    "sync_close",
    "sync_stats",
    "sync_update_config",
    "tune_gc",
]

log = logging.getLogger(__name__)

SyncFactory = Callable[[ClusterConfig, str, Dataplane], SyncRoles]

RETRY_INITIAL = 0.2
RETRY_MAX = 5.0


class AgentSyncRoles:
    """One per agent, shared by its VIP groups.

    The node's one FlowSyncServer (one sync_address) starts with the first group this
    node holds and then serves until close(): each group's term adds that group's feed
    and removes it when the term ends, so the groups still held keep being served.
    The dataplane's flow source runs while at least one group is held; its changes go
    to the feed of the group whose VIP they name. Each followed group has its own
    client, which accepts only that group's flows under that group's term.
    """

    def __init__(
        self,
        *,
        config: ClusterConfig,
        node: str,
        dataplane: Dataplane,
        security: SyncSecurity,
        source_factory: Callable[[], FlowSource] | None = None,
        server_options: ServerOptions | None = None,
        client_options: ClientOptions | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self.dataplane = dataplane
        self.security = security
        # The dataplane's own flow source unless a test injects another.
        self._source_factory = source_factory or dataplane.flow_source
        self._server_options = server_options
        self._client_options = client_options
        self._server: FlowSyncServer | None = None
        self._server_lock = asyncio.Lock()
        self._source: FlowSource | None = None
        self._source_task: asyncio.Task[None] | None = None
        self._source_lock = asyncio.Lock()
        self._vips = _group_vips(config)
        self._clients: dict[str, FlowSyncClient] = {}  # group -> client
        # Answers the hold's Promise calls on the node's server (halb.agent.witness).
        self.promises: PromiseDesk | None = None
        self._last: dict[str, dict[str, Any]] = {}  # group -> its last role's doc

    def update_config(self, config: ClusterConfig) -> None:
        """A new config revision: the clients validate flows against its services, and
        pushes are routed by its groups' VIPs."""
        self.config = config
        self._vips = _group_vips(config)
        for c in self._clients.values():
            c.update_config(config)

    async def close(self) -> None:
        """Stop the node's server and flow source (the agent is stopping)."""
        await self._stop_source()
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    async def start_server(self) -> None:
        """Start the node's server now, not with the first group held: in hold mode
        standbys answer Promise calls on it."""
        await self._running_server()

    # -- the active's role -----------------------------------------------------------

    async def serve(self, group: str, term: Term) -> None:
        """Serve ``group``'s flows under ``term`` until cancelled."""
        server = await self._running_server()
        feed: FlowFeed | None = None
        try:
            await self._start_source()
            feed = server.add_feed(group, _GroupSnapshot(self, group), term)
            await asyncio.get_running_loop().create_future()  # until the term ends
        finally:
            if feed is not None:
                self._last[group] = self._feed_doc(feed.stats(server.address, server.refused))
                server.remove_feed(feed)
            if not server.feeds:
                # Shielded: the term is over either way; the source must not keep
                # running (its XDP events ring is armed only on an active node).
                await asyncio.shield(self._stop_source())

    async def _running_server(self) -> FlowSyncServer:
        """The node's server, started (and bound) on first use; retried with backoff,
        since a port still held (a previous agent's) must not fail the term."""
        async with self._server_lock:
            delay = RETRY_INITIAL
            while self._server is None:
                server = FlowSyncServer(
                    security=self.security,
                    address=str(self.config.node(self.node).sync_address),
                    options=self._server_options,
                )
                server.promises = self.promises
                try:
                    await server.start()
                    self._server = server
                except Exception as exc:
                    log.error("flow sync server cannot start (%s); retrying in %.1f s",
                              exc, delay)  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
            return self._server

    async def _start_source(self) -> None:
        async with self._source_lock:
            if self._source_task is None:
                self._source = await asyncio.to_thread(self._source_factory)
                self._source_task = asyncio.create_task(self._run_source(), name="flow-source")

    async def _stop_source(self) -> None:
        async with self._source_lock:
            task, self._source_task = self._source_task, None
            await cancel_and_wait(task, log, "the flow source failed")
            source, self._source = self._source, None
            if source is not None:
                source.close()

    async def _run_source(self) -> None:
        """The flow source until cancelled; a failure restarts it with backoff (a term
        must never end because of it)."""
        delay = RETRY_INITIAL
        while True:
            source = self._source
            assert source is not None
            try:
                await source.run(self._push)
                raise RuntimeError("the flow source stopped")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("flow source failed (%s); restarting it in %.1f s", exc, delay,
                          exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            source.close()
            self._source = await asyncio.to_thread(self._source_factory)

    def _push(self, upserts: FlowBatch, deletes: FlowBatch) -> None:
        """One change set of the node's source, split by group into the feeds."""
        server = self._server
        if server is None:
            return
        ups, dels = records.as_records(upserts), records.as_records(deletes)
        for group, feed in server.feeds.items():
            vips = self._vips.get(group, frozenset())
            g_ups, g_dels = records.with_vips(ups, vips), records.with_vips(dels, vips)
            if g_ups or g_dels:
                feed.push(g_ups, g_dels)

    def _snapshot(self, group: str) -> bytes:
        """``group``'s current flows (worker thread)."""
        source = self._source
        if source is None:
            raise RuntimeError("no flow source: this node holds no group")
        return records.with_vips(source.snapshot_records(), self._vips.get(group, frozenset()))

    # -- a standby's role ------------------------------------------------------------

    async def follow(self, group: str, leader: Leader) -> None:
        """Install ``group``'s flows from its active node until cancelled."""
        if leader.holder == self.node:
            await asyncio.get_running_loop().create_future()
        try:
            self.config.node(leader.holder)
        except KeyError:
            log.error("flow sync: leader %s of group %s is not a node of the config; not "
                      "following it", leader.holder, group)  # fmt: skip
            await asyncio.get_running_loop().create_future()
        client = FlowSyncClient(
            config=self.config,
            node=self.node,
            peer=leader.holder,
            dataplane=self.dataplane,
            security=self.security,
            known_term=leader.term,
            options=self._client_options,
            group=group,
        )
        self._clients[group] = client
        log.info("flow sync: following %s for group %s (term %s) at %s", leader.holder, group,
                 leader.term, self.config.node(leader.holder).sync_address)  # fmt: skip
        client.start()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            # Not shielded: the runtime cancels once and waits for this to return, and
            # the client's stop() waits for the dataplane write in progress.
            t0 = time.monotonic()
            await client.stop()
            self._last[group] = _client_doc(client)
            if self._clients.get(group) is client:
                del self._clients[group]
            st = client.stats()
            log.info("flow sync: stopped following %s for group %s after %d flows installed "
                     "(%d held, synced=%s); dataplane writes settled in %.1f ms", leader.holder,
                     group, st.entries_installed, st.flows, st.synced,
                     (time.monotonic() - t0) * 1e3)  # fmt: skip

    def caught_up(self, group: str, leader: Leader) -> bool:
        """Whether this standby holds ``group``'s flows from that leader: connected,
        snapshot done."""
        client = self._clients.get(group)
        if client is None:
            return False
        st = client.stats()
        return bool(st.peer == leader.holder and st.connected and st.synced)

    # -- status ----------------------------------------------------------------------

    def _feed_doc(self, st: ServerStats) -> dict[str, Any]:
        peers: list[dict[str, Any]] = [
            {
                "node": p.node,
                "state": p.state,
                "lag_sequence": p.lag_sequence,
                "lag_ms": round(p.lag_seconds * 1e3, 1),
                "entries_sent": p.entries_sent,
                "snapshots": p.snapshots,
            }
            for p in st.peers
        ]
        doc: dict[str, Any] = {
            "role": "server",
            "connected_peers": len(st.peers),
            "lag_ms": max((round(p.lag_seconds * 1e3, 1) for p in st.peers), default=0.0),
            "entries_synced": st.entries_published,
            "last_resync": st.last_resync,
            "dropped": sum(st.refused.values()),
        }
        detail: dict[str, Any] = {
            "term": str(st.term),
            "address": st.address,
            "snapshots_sent": st.snapshots_sent,
            "resumes": st.resumes,
            "backlog_entries": st.backlog_entries,
            "peers": peers,
            "refused": dict(st.refused),
        }
        if self._source is not None:
            src_doc = _stats_doc(self._source.stats())
            # The node's source sees every group's flows (synced ones too).
            detail["source"] = src_doc
        doc["detail"] = detail
        return doc

    def stats(self) -> dict[str, Any]:
        """The status document's ``sync`` field: scalars first (`halb status` prints
        those), details in nested values (for --output json). ``groups`` holds one
        document per group this node serves or follows; the scalars sum them up (with
        one group: that group's document)."""
        groups: dict[str, dict[str, Any]] = {}
        server = self._server
        if server is not None:
            for group, st in server.feed_stats().items():
                groups[group] = self._feed_doc(st)
        for group, client in self._clients.items():
            groups[group] = _client_doc(client)
        if not groups:
            last = dict(self._last)
            return {"role": "idle", **({"previous": last} if last else {})}
        if len(groups) == 1:
            return {**next(iter(groups.values())), "groups": groups}
        docs = list(groups.values())
        clients = [d for d in docs if d["role"] == "client"]
        summary: dict[str, Any] = {
            # A node that serves any group is a server for its metrics' role gauge.
            "role": "server" if len(clients) < len(docs) else "client",
            "connected_peers": sum(d["connected_peers"] for d in docs),
            "entries_synced": sum(d["entries_synced"] for d in docs),
            "dropped": sum(d["dropped"] for d in docs),
        }
        if clients:
            summary["synced"] = all(d["synced"] for d in clients)
            summary["flows"] = sum(d["flows"] for d in clients)
            summary["lag_sequence"] = max(d["lag_sequence"] for d in clients)
        return {**summary, "groups": groups}


class _GroupSnapshot:
    """One group's FlowSnapshot: the node source's snapshot, filtered to its VIPs."""

    def __init__(self, roles: AgentSyncRoles, group: str) -> None:
        self._roles = roles
        self._group = group

    def snapshot_records(self) -> bytes:
        return self._roles._snapshot(self._group)


def _group_vips(config: ClusterConfig) -> dict[str, frozenset[bytes]]:
    """Group name -> its VIPs as flow records hold them (addr16)."""
    return {g.name: frozenset(records.addr16(v.address) for v in g.vips) for g in config.vip_groups}


def _stats_doc(stats: object) -> dict[str, Any]:
    """A source's stats() (a dataclass or a mapping) as a plain dict."""
    if is_dataclass(stats) and not isinstance(stats, type):
        return asdict(stats)
    return dict(stats) if isinstance(stats, Mapping) else {}


def _client_doc(client: FlowSyncClient) -> dict[str, Any]:
    st = client.stats()
    age = st.last_message_age
    return {
        "role": "client",
        "peer": st.peer,
        "synced": st.synced,
        "connected_peers": 1 if st.connected else 0,
        "lag_sequence": st.lag_sequence,
        "flows": st.flows,
        "entries_synced": st.entries_installed,
        "last_resync": st.last_resync,
        "dropped": sum(st.dropped.values()),
        "detail": {
            "connected": st.connected,
            "last_message_ms": None if age is None else round(age * 1e3, 1),
            "entries_deleted": st.entries_deleted,
            "snapshots": st.snapshots,
            "resumes": st.resumes,
            "reconnects": st.reconnects,
            "stale_term_streams": st.stale_term_streams,
            "stream_term": None if st.stream_term is None else str(st.stream_term),
            "last_error": st.last_error,
            "drops": dict(st.dropped),
        },
    }


class SyncSetupError(RuntimeError):
    """Flow sync cannot be set up as configured; worded for the operator."""


def make_sync_roles(
    cfg: ClusterConfig, node: str, dataplane: Dataplane, *, allow_insecure: bool = False
) -> AgentSyncRoles:
    """The agent's SyncFactory (bind allow_insecure with functools.partial)."""
    try:
        security = SyncSecurity.from_config(cfg, node, allow_insecure=allow_insecure)
    except InsecureNotAllowed as exc:
        raise SyncSetupError(
            f"{exc} (halb agent --allow-insecure-sync; or --no-sync to run without flow sync)"
        ) from None
    except (OSError, ValueError) as exc:
        raise SyncSetupError(f"flow sync TLS: {exc}") from None
    return AgentSyncRoles(config=cfg, node=node, dataplane=dataplane, security=security)


def sync_stats(sync: SyncRoles | None) -> dict[str, Any]:
    """What the status document's ``sync`` field shows for these roles."""
    if sync is None:
        return {"role": "disabled"}
    stats = getattr(sync, "stats", None)
    return dict(stats()) if callable(stats) else {}


async def sync_close(sync: SyncRoles | None) -> None:
    """The agent is stopping: free the node's sync server and flow source."""
    if isinstance(sync, AgentSyncRoles):
        await sync.close()


def sync_update_config(sync: SyncRoles | None, cfg: ClusterConfig) -> None:
    update = getattr(sync, "update_config", None)
    if callable(update):
        update(cfg)


def tune_gc() -> None:
    """The agent's GC policy, called once start-up is done.

    Full collections walk every tracked object; with a large flow table (the sync
    client's bookkeeping, batches in flight) they pause the loop for tens of ms and
    show up as sync lag. Freezing moves everything allocated so far (modules, config,
    gRPC and etcd stubs) out of the collector's sight, and a larger first threshold
    makes young collections rarer; reference cycles are rare in this code. Measured
    with bench/sync.py (20k new flows/s): p99 push-to-install lag 64 ms with the
    default thresholds, 19 ms with these; a 200k-flow resync 2.1 s -> 1.25 s.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)  # as bench/sync.py --gc tuned measured
