"""Thin IPVS generic-netlink client (pyroute2's message classes, plus the sync-daemon
attributes pyroute2 leaves undecoded). Every method is one kernel request.

pyroute2's IPVS helper is not used for writes: its ``update`` command sends a delete,
and an unknown ``sched=`` keyword silently means wlc. The socket is opened inside the
target namespace on a throwaway thread and handed to pyroute2 by file descriptor.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, nla
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.generic import ipvs as genl

from halb.dataplane.ipvs.kernel import DestSpec, FwdMethod, KernelService, ServiceSpec
from halb.dataplane.xdp.netns import in_netns
from halb.model import IPAddress, Protocol, ServiceKey

__all__ = ["DaemonState", "IpvsNetlink", "IpvsStats", "SyncDaemon"]

NETLINK_GENERIC = 16
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
PROTOCOLS = {6: Protocol.TCP, 17: Protocol.UDP}


class DaemonState:
    MASTER = 1
    BACKUP = 2


class _msg(genl.ipvsmsg):  # type: ignore[misc]
    nla_map = (
        ("IPVS_CMD_ATTR_UNSPEC", "none"),
        ("IPVS_CMD_ATTR_SERVICE", "service"),
        ("IPVS_CMD_ATTR_DEST", "dest"),
        ("IPVS_CMD_ATTR_DAEMON", "daemon"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_UDP", "uint32"),
    )

    class daemon(nla):  # type: ignore[misc]
        prefix = "IPVS_DAEMON_ATTR_"
        nla_map = (
            ("IPVS_DAEMON_ATTR_UNSPEC", "none"),
            ("IPVS_DAEMON_ATTR_STATE", "uint32"),
            ("IPVS_DAEMON_ATTR_MCAST_IFN", "asciiz"),
            ("IPVS_DAEMON_ATTR_SYNC_ID", "uint32"),
            ("IPVS_DAEMON_ATTR_SYNC_MAXLEN", "uint16"),
            ("IPVS_DAEMON_ATTR_MCAST_GROUP", "ip4addr"),
            ("IPVS_DAEMON_ATTR_MCAST_GROUP6", "ip6addr"),
            ("IPVS_DAEMON_ATTR_MCAST_PORT", "be16"),
            ("IPVS_DAEMON_ATTR_MCAST_TTL", "uint8"),
        )


@dataclass(frozen=True, slots=True)
class IpvsStats:
    conns: int = 0
    inpkts: int = 0
    outpkts: int = 0
    inbytes: int = 0
    outbytes: int = 0


@dataclass(frozen=True, slots=True)
class SyncDaemon:
    state: int
    interface: str
    sync_id: int


def _stats(attrs: Any) -> IpvsStats:
    raw = attrs.get_attr(attrs.prefix + "STATS64") or attrs.get_attr(attrs.prefix + "STATS")
    if raw is None:
        return IpvsStats()
    get = raw.get_attr
    return IpvsStats(
        get("IPVS_STATS_ATTR_CONNS") or 0,
        get("IPVS_STATS_ATTR_INPKTS") or 0,
        get("IPVS_STATS_ATTR_OUTPKTS") or 0,
        get("IPVS_STATS_ATTR_INBYTES") or 0,
        get("IPVS_STATS_ATTR_OUTBYTES") or 0,
    )


def _service_key_attrs(key: ServiceKey) -> list[tuple[str, Any]]:
    return [
        ("IPVS_SVC_ATTR_AF", AF[key.vip.version]),
        ("IPVS_SVC_ATTR_PROTOCOL", key.protocol.number),
        ("IPVS_SVC_ATTR_ADDR", str(key.vip)),
        ("IPVS_SVC_ATTR_PORT", key.port),
    ]


def _service_attrs(spec: ServiceSpec) -> list[tuple[str, Any]]:
    # NETMASK is required on create; for IPv6 the kernel reads a prefix length from the
    # same native-endian u32, which "128.0.0.0" encodes on little-endian hosts.
    netmask = "255.255.255.255" if spec.key.vip.version == 4 else "128.0.0.0"
    return [
        *_service_key_attrs(spec.key),
        ("IPVS_SVC_ATTR_SCHED_NAME", spec.sched),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": spec.flags, "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", 0),
        ("IPVS_SVC_ATTR_NETMASK", netmask),
    ]


def _dest_attrs(dest: DestSpec) -> list[tuple[str, Any]]:
    return [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", AF[dest.address.version]),
        ("IPVS_DEST_ATTR_ADDR", str(dest.address)),
        ("IPVS_DEST_ATTR_PORT", dest.port),
        ("IPVS_DEST_ATTR_FWD_METHOD", int(dest.fwd)),
        ("IPVS_DEST_ATTR_WEIGHT", dest.weight),
        ("IPVS_DEST_ATTR_U_THRESH", 0),
        ("IPVS_DEST_ATTR_L_THRESH", 0),
    ]


class IpvsNetlink:
    def __init__(self, netns: str | None = None) -> None:
        # The socket's namespace is fixed when it is created.
        fd = in_netns(
            netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_GENERIC)
        ).detach()
        self._sock = GenericNetlinkSocket(fileno=fd)
        try:
            self._sock.bind(genl.GENL_NAME, _msg)
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def _request(self, cmd: int, attrs: list[tuple[str, Any]], dump: bool = False) -> list[Any]:
        msg = _msg()
        msg["cmd"] = cmd
        msg["version"] = genl.GENL_VERSION
        msg["attrs"] = attrs
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        if cmd in (genl.IPVS_CMD_NEW_SERVICE, genl.IPVS_CMD_NEW_DEST):
            flags |= NLM_F_CREATE | NLM_F_EXCL
        return list(self._sock.nlm_request(msg, msg_type=self._sock.prid, msg_flags=flags))

    # -- services and dests ------------------------------------------------------------------

    def dump(self) -> dict[ServiceKey, tuple[KernelService, IpvsStats, dict[DestSpec, IpvsStats]]]:
        """Every service with its dests and their stats (fwmark services are skipped)."""
        out = {}
        for msg in self._request(genl.IPVS_CMD_GET_SERVICE, [], dump=True):
            svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            if svc is None or svc.get_attr("IPVS_SVC_ATTR_FWMARK"):
                continue
            proto = PROTOCOLS.get(svc.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
            if proto is None:
                continue
            key = ServiceKey(
                ip_address(svc.get_attr("IPVS_SVC_ATTR_ADDR")),
                svc.get_attr("IPVS_SVC_ATTR_PORT"),
                proto,
            )
            flags = svc.get_attr("IPVS_SVC_ATTR_FLAGS") or {"flags": 0}
            # The kernel reports its own IP_VS_SVC_F_HASHED bit: not ours to compare.
            spec = ServiceSpec(key, svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME"), flags["flags"] & ~2)
            dests = self._dests(key)
            ks = KernelService(spec, tuple(sorted(dests)))
            out[key] = (ks, _stats(svc), dests)
        return out

    def _dests(self, key: ServiceKey) -> dict[DestSpec, IpvsStats]:
        out = {}
        attrs = [("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_key_attrs(key)})]
        for msg in self._request(genl.IPVS_CMD_GET_DEST, attrs, dump=True):
            d = msg.get_attr("IPVS_CMD_ATTR_DEST")
            if d is None:
                continue
            spec = DestSpec(
                ip_address(d.get_attr("IPVS_DEST_ATTR_ADDR")),
                d.get_attr("IPVS_DEST_ATTR_PORT"),
                FwdMethod(d.get_attr("IPVS_DEST_ATTR_FWD_METHOD") & 0x7),
                d.get_attr("IPVS_DEST_ATTR_WEIGHT"),
            )
            out[spec] = _stats(d)
        return out

    def add_service(self, spec: ServiceSpec) -> None:
        self._service(genl.IPVS_CMD_NEW_SERVICE, spec)

    def edit_service(self, spec: ServiceSpec) -> None:
        self._service(genl.IPVS_CMD_SET_SERVICE, spec)

    def del_service(self, key: ServiceKey) -> None:
        attrs = [("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_key_attrs(key)})]
        self._request(genl.IPVS_CMD_DEL_SERVICE, attrs)

    def _service(self, cmd: int, spec: ServiceSpec) -> None:
        self._request(cmd, [("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_attrs(spec)})])

    def add_dest(self, key: ServiceKey, dest: DestSpec) -> None:
        self._dest(genl.IPVS_CMD_NEW_DEST, key, _dest_attrs(dest))

    def edit_dest(self, key: ServiceKey, dest: DestSpec) -> None:
        self._dest(genl.IPVS_CMD_SET_DEST, key, _dest_attrs(dest))

    def del_dest(self, key: ServiceKey, address: IPAddress, port: int) -> None:
        attrs = [
            ("IPVS_DEST_ATTR_ADDR_FAMILY", AF[address.version]),
            ("IPVS_DEST_ATTR_ADDR", str(address)),
            ("IPVS_DEST_ATTR_PORT", port),
        ]
        self._dest(genl.IPVS_CMD_DEL_DEST, key, attrs)

    def _dest(self, cmd: int, key: ServiceKey, dest: list[tuple[str, Any]]) -> None:
        attrs = [
            ("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_key_attrs(key)}),
            ("IPVS_CMD_ATTR_DEST", {"attrs": dest}),
        ]
        self._request(cmd, attrs)

    # -- the kernel's sync daemons ---------------------------------------------------------

    def daemons(self) -> list[SyncDaemon]:
        out = []
        for msg in self._request(genl.IPVS_CMD_GET_DAEMON, [], dump=True):
            d = msg.get_attr("IPVS_CMD_ATTR_DAEMON")
            if d is not None:
                out.append(
                    SyncDaemon(
                        d.get_attr("IPVS_DAEMON_ATTR_STATE"),
                        d.get_attr("IPVS_DAEMON_ATTR_MCAST_IFN"),
                        d.get_attr("IPVS_DAEMON_ATTR_SYNC_ID"),
                    )
                )
        return out

    def start_daemon(self, state: int, interface: str, sync_id: int) -> None:
        attrs = [
            ("IPVS_DAEMON_ATTR_STATE", state),
            ("IPVS_DAEMON_ATTR_MCAST_IFN", interface),
            ("IPVS_DAEMON_ATTR_SYNC_ID", sync_id),
        ]
        self._request(genl.IPVS_CMD_NEW_DAEMON, [("IPVS_CMD_ATTR_DAEMON", {"attrs": attrs})])

    def stop_daemon(self, state: int) -> None:
        attrs = [("IPVS_DAEMON_ATTR_STATE", state)]
        self._request(genl.IPVS_CMD_DEL_DAEMON, [("IPVS_CMD_ATTR_DAEMON", {"attrs": attrs})])
