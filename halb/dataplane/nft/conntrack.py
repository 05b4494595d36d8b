"""Conntrack flows of the nft dataplane: dump, install, delete, reconcile (blocking).

Installed entries are created the one way ctnetlink accepts a NATed entry from another
node: the original tuple, its reverse as the reply tuple, and CTA_NAT_DST (plus
CTA_NAT_SRC for fullnat) so the kernel rebuilds the real reply tuple and binds the
NAT; status CONFIRMED|SEEN_REPLY|ASSURED, a timeout, and for TCP the ESTABLISHED state
with BE_LIBERAL window tracking in both directions (the standby never saw the
sequence numbers).
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from halb.dataplane.nft import ctmsg
from halb.dataplane.nft.ctsock import CtSocket
from halb.dataplane.nft.flows import FlowEntry, FlowMap
from halb.model import Flow, Protocol

log = logging.getLogger(__name__)

__all__ = ["Conntrack", "InstallReport", "ReconcileReport", "Timeouts"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds an injected entry lives without traffic. TCP matches the kernel's
    established timeout (the active's entry lives that long too); stale entries are
    removed by sync deletes and reconcile, not by expiry."""

    tcp: int = 432000
    udp: int = 180


@dataclass(slots=True)
class InstallReport:
    created: int = 0
    replaced: int = 0  # an entry with another backend was there and was replaced
    present: int = 0  # already there with the same backend
    refused: Counter[str] = field(default_factory=Counter)  # reason -> count
    refused_flows: list[tuple[Flow, str]] = field(default_factory=list)

    @property
    def written(self) -> int:
        return self.created + self.replaced


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    deleted: int
    installed: InstallReport


# Keep a bounded sample of refused flows for logs and tests.
_MAX_REFUSED_SAMPLE = 100


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _same_snat(have: FlowEntry, want: FlowEntry, fmap: FlowMap) -> bool:
    """The kept entry translates the source as ``want`` needs: not at all (nat), or to
    this node's SNAT address (fullnat; and port, when the sender said). A leftover
    fullnat entry must not pass for a nat flow, nor the reverse."""
    _dnat, snat = fmap.nat_for(want)
    if snat is None:
        return have.snat is None
    if have.snat is None:
        # nf_nat kept both the address and port: only possible if SNAT is the client.
        return False
    return have.snat == snat.addr and (want.snat_port is None or have.snat_port == snat.port)


class Conntrack:
    """One ctnetlink socket in a namespace; flows mapped through a FlowMap."""

    def __init__(self, netns: str | None = None, timeouts: Timeouts | None = None) -> None:
        self.netns = netns
        self.timeouts = timeouts or Timeouts()
        self.sock = CtSocket(netns)

    @property
    def portid(self) -> int:
        """Our netlink port id: events caused by our own writes carry it."""
        return self.sock.portid

    def close(self) -> None:
        self.sock.close()

    # -- read ---------------------------------------------------------------------------

    def dump(self, fmap: FlowMap) -> list[FlowEntry]:
        """Every entry of the namespace that is a flow of one of fmap's services."""
        out = []
        for entry in self.sock.dump():
            fe = fmap.flow_of(entry)
            if fe is not None:
                out.append(fe)
        return out

    def dump_records(self, fmap: FlowMap) -> bytes:
        """dump() as packed flow records, decoded in bulk (halb.dataplane.nft.ctdump)."""
        from halb.dataplane.nft.ctdump import dump_records

        return dump_records(self.sock, fmap)

    # -- write --------------------------------------------------------------------------

    def install(
        self, entries: Iterable[FlowEntry | Flow], fmap: FlowMap, *, replace: bool = True
    ) -> InstallReport:
        """Create entries for these flows. One that exists with the same backend is left
        alone; one with another backend is replaced when ``replace``."""
        report = InstallReport()

        def refuse(fe: FlowEntry, reason: str) -> None:
            report.refused[reason] += 1
            if len(report.refused_flows) < _MAX_REFUSED_SAMPLE:
                report.refused_flows.append((fe.flow, reason))

        pending: dict[int, FlowEntry] = {}
        requests: list[tuple[int, bytes]] = []
        for item in entries:
            fe = item if isinstance(item, FlowEntry) else FlowEntry(item)
            why = fmap.refusal(fe)
            if why is not None:
                refuse(fe, why.value)
                continue
            seq = self.sock.next_seq()
            try:
                requests.append((seq, self._create(seq, fe, fmap)))
            except ValueError as exc:
                log.debug("refusing %s: %s", fe.flow, exc)
                refuse(fe, "malformed")
                continue
            pending[seq] = fe

        self._finish(requests, pending.__getitem__, set(pending), fmap, report, refuse, replace)
        return report

    def install_records(self, recs: bytes, fmap: FlowMap) -> InstallReport:
        """install() for packed flow records (halb.flows.records, validated): the create
        messages of a whole buffer are built at once (halb.dataplane.nft.ctbulk); a
        record the bulk encoder leaves out, or the kernel refuses, becomes a FlowEntry
        and takes install()'s path (refusal reasons, replacing a stale entry)."""
        from halb.dataplane.nft.ctbulk import encode_creates
        from halb.flows import records

        report = InstallReport()

        def refuse(fe: FlowEntry, reason: str) -> None:
            report.refused[reason] += 1
            if len(report.refused_flows) < _MAX_REFUSED_SAMPLE:
                report.refused_flows.append((fe.flow, reason))

        timeouts = {Protocol.TCP: self.timeouts.tcp, Protocol.UDP: self.timeouts.udp}
        enc = encode_creates(recs, fmap, timeouts, self.sock.next_seq)

        def entry(seq: int) -> FlowEntry:
            i = enc.row_of_seq[seq]
            one = recs[i * records.RECORD_SIZE : (i + 1) * records.RECORD_SIZE]
            return FlowEntry(records.to_flows(one)[0], None, records.nat_ports(one)[0])

        self._finish(enc.requests, entry, set(enc.row_of_seq), fmap, report, refuse, True)
        if enc.others:
            rest = b"".join(
                recs[i * records.RECORD_SIZE : (i + 1) * records.RECORD_SIZE] for i in enc.others
            )
            flows, ports = records.to_flows(rest), records.nat_ports(rest)
            slow = self.install(
                [FlowEntry(f, None, p) for f, p in zip(flows, ports, strict=True)], fmap
            )
            report.created += slow.created
            report.replaced += slow.replaced
            report.present += slow.present
            report.refused.update(slow.refused)
            report.refused_flows.extend(slow.refused_flows[:_MAX_REFUSED_SAMPLE])
        return report

    def _finish(
        self,
        requests: list[tuple[int, bytes]],
        entry: Callable[[int], FlowEntry],
        pending: set[int],
        fmap: FlowMap,
        report: InstallReport,
        refuse: Callable[[FlowEntry, str], None],
        replace: bool,
    ) -> None:
        """Send the creates; count what the kernel made, replace or keep what was there
        (EEXIST), refuse the rest by errno."""
        existing: list[FlowEntry] = []
        for seq, (code, _data) in self.sock.batch(requests).items():
            pending.discard(seq)
            if code == 0:
                report.created += 1
            elif code == errno.EEXIST and replace:
                existing.append(entry(seq))
            else:
                refuse(entry(seq), f"kernel_{_errname(code)}")
        for seq in pending:
            refuse(entry(seq), "no_answer")
        if existing:
            self._resolve_existing(existing, fmap, report, refuse)
        if report.refused:
            log.warning(
                "conntrack install refused %d flow(s): %s",
                sum(report.refused.values()),
                dict(report.refused),
            )

    def _create(self, seq: int, fe: FlowEntry, fmap: FlowMap) -> bytes:
        f = fe.flow
        dnat, snat = fmap.nat_for(fe)
        timeout = self.timeouts.tcp if f.protocol is Protocol.TCP else self.timeouts.udp
        return ctmsg.encode_create(
            seq, fmap.orig_tuple(f), timeout=timeout, nat_dst=dnat, nat_src=snat
        )

    def _resolve_existing(
        self,
        existing: list[FlowEntry],
        fmap: FlowMap,
        report: InstallReport,
        refuse: Callable[[FlowEntry, str], None],
    ) -> None:
        """An entry with the same original tuple is there: keep it if it has the same
        backend, else replace it (NAT bindings cannot be changed in place)."""
        gets = {}
        for fe in existing:
            seq = self.sock.next_seq()
            gets[seq] = (fe, ctmsg.encode_get(seq, fmap.orig_tuple(fe.flow)))
        stale: list[FlowEntry] = []
        kept: list[FlowEntry] = []
        for seq, (code, data) in self.sock.batch([(s, m) for s, (_, m) in gets.items()]).items():
            fe = gets[seq][0]
            entry = ctmsg.decode_entry(data) if code == 0 and data is not None else None
            have = fmap.flow_of(entry) if entry is not None else None
            if have is not None and have.flow == fe.flow and _same_snat(have, fe, fmap):
                report.present += 1
                kept.append(fe)
            else:
                stale.append(fe)
        self._make_liberal(kept, fmap)
        if not stale:
            return
        self.delete([fe.flow for fe in stale], fmap)
        # Once only: an EEXIST now means the *reply* tuple clashes with another entry.
        again = self.install(stale, fmap, replace=False)
        report.replaced += again.created
        report.present += again.present
        for reason, n in again.refused.items():
            report.refused[reason] += n
        report.refused_flows.extend(again.refused_flows[:_MAX_REFUSED_SAMPLE])

    def _make_liberal(self, kept: list[FlowEntry], fmap: FlowMap) -> None:
        """Entries kept from an earlier term track stale TCP windows: loosen them as
        injected entries are (else their packets are invalid, dropped, and the
        connection stalls when this node carries it again)."""
        requests = []
        for fe in kept:
            if fe.flow.protocol is Protocol.TCP:
                seq = self.sock.next_seq()
                requests.append((seq, ctmsg.encode_liberal(seq, fmap.orig_tuple(fe.flow))))
        for code, _data in self.sock.batch(requests).values():
            if code != 0:
                log.debug("conntrack: could not loosen an existing entry: %s", _errname(code))

    def delete(self, flows: Iterable[Flow], fmap: FlowMap) -> int:
        """Delete the entries of these flows (by original tuple); returns how many were
        there. Missing ones (ENOENT) are not an error."""
        requests = []
        for f in flows:
            seq = self.sock.next_seq()
            try:
                requests.append((seq, ctmsg.encode_delete(seq, fmap.orig_tuple(f))))
            except ValueError:
                log.debug("not deleting malformed flow %s", f)
        deleted = 0
        for code, _data in self.sock.batch(requests).values():
            if code == 0:
                deleted += 1
            elif code != errno.ENOENT:
                log.warning("conntrack delete failed: %s", _errname(code))
        return deleted

    def reconcile(self, desired: Iterable[FlowEntry | Flow], fmap: FlowMap) -> ReconcileReport:
        """Make the table hold exactly ``desired`` among halb's flows: delete entries of
        our services that are not desired (or have another backend), install the
        missing ones."""
        want: dict[Flow, FlowEntry] = {}
        for item in desired:
            fe = item if isinstance(item, FlowEntry) else FlowEntry(item)
            want[fe.flow] = fe
        have = {fe.flow: fe for fe in self.dump(fmap)}
        stale = [f for f in have if f not in want]
        deleted = self.delete(stale, fmap) if stale else 0
        missing = [fe for f, fe in want.items() if f not in have]
        report = self.install(missing, fmap) if missing else InstallReport()
        if deleted or missing:
            log.info(
                "conntrack reconcile: deleted %d stale, installed %d missing (%d refused)",
                deleted,
                report.written,
                sum(report.refused.values()),
            )
        return ReconcileReport(deleted=deleted, installed=report)
