"""Pure parts of halb.etcd: error classification, endpoints, watch resume, stubs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import descriptor_pool

from halb.etcd import ClientSettings, Compare, EventKind, KeyValue, WatchEvent
from halb.etcd.channel import Member, channel_options, parse_endpoints, target
from halb.etcd.errors import (
    Action,
    AuthFailed,
    LeaseNotFound,
    PermissionDenied,
    classify,
    diagnose_connect,
)
from halb.etcd.kv import prefix_end
from halb.etcd.proto import load, strip_annotations
from halb.etcd.watch import Resume

pytestmark = pytest.mark.unit

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "details", "action"),
    [
        (C.UNAVAILABLE, "etcdserver: no leader", Action.ROTATE),
        (C.UNAVAILABLE, "etcdserver: leader changed", Action.ROTATE),
        (C.UNAVAILABLE, "failed to connect to all addresses", Action.RETRY),
        (C.DEADLINE_EXCEEDED, "Deadline Exceeded", Action.ROTATE),
        (C.UNAUTHENTICATED, "etcdserver: invalid auth token", Action.RENEW_TOKEN),
        (C.CANCELLED, "Channel closed!", Action.RETRY),
        (C.UNKNOWN, "context deadline exceeded", Action.ROTATE),
        (C.INVALID_ARGUMENT, "etcdserver: key is not provided", Action.FINAL),
    ],
)
def test_classify_actions(code: grpc.StatusCode, details: str, action: Action) -> None:
    assert classify(code, details).action is action


def test_classify_final_errors_name_the_condition() -> None:
    assert classify(C.NOT_FOUND, "etcdserver: requested lease not found").error is LeaseNotFound
    assert classify(C.PERMISSION_DENIED, "etcdserver: permission denied").error is PermissionDenied
    failed = "etcdserver: authentication failed, invalid user ID or password"
    assert classify(C.INVALID_ARGUMENT, failed).error is AuthFailed


def test_diagnose_tls_causes() -> None:
    assert "wrong CA" in (
        diagnose_connect("CERTIFICATE_VERIFY_FAILED", tls=True, server_name="x") or ""
    )
    name = diagnose_connect("Hostname Verification Check failed.", tls=True, server_name="etcd.a")
    assert name is not None and "'etcd.a'" in name
    assert "client's certificate" in (
        diagnose_connect("Unwrap failed (TSI_DATA_CORRUPTED)", tls=True, server_name=None) or ""
    )
    assert "plaintext" in (
        diagnose_connect("Handshake read failed (Socket closed)", tls=True, server_name=None) or ""
    )
    assert diagnose_connect("Connection refused", tls=False, server_name=None) is None


def test_endpoints_parse_and_target() -> None:
    tls, members = parse_endpoints(["http://10.0.0.1:2379", "http://10.0.0.2"])
    assert not tls
    assert members == [Member("10.0.0.1", 2379), Member("10.0.0.2", 2379)]
    assert target([Member("a", 1, "10.0.0.1"), Member("b", 2, "10.0.0.2")]) == (
        "ipv4:10.0.0.1:1,10.0.0.2:2"
    )
    assert target([Member("::1", 2379, "::1")]) == "ipv6:[::1]:2379"
    with pytest.raises(ValueError, match=r"etcd\.endpoints\[1\]"):
        parse_endpoints(["http://a:1", "ftp://b:2"])
    with pytest.raises(ValueError, match="mixes http"):
        parse_endpoints(["http://a:1", "https://b:2"])


def test_channel_options_follow_platform_md() -> None:
    opts = dict(channel_options("etcd.example"))
    assert opts["grpc.keepalive_time_ms"] == 5000
    assert opts["grpc.http2.ping_timeout_ms"] == 1000
    assert opts["grpc.http2.max_pings_without_data"] == 0
    assert opts["grpc.ssl_target_name_override"] == "etcd.example"
    assert opts["grpc.default_authority"] == "etcd.example"
    assert "pick_first" in str(opts["grpc.service_config"])


def _ev(key: bytes, rev: int) -> WatchEvent:
    return WatchEvent(EventKind.PUT, KeyValue(key, b"", rev, rev, 1, 0))


def test_resume_drops_repeated_revisions_and_advances() -> None:
    r = Resume(5)
    assert r.accept([_ev(b"a", 5), _ev(b"b", 5)]) == [_ev(b"a", 5), _ev(b"b", 5)]
    assert r.next == 6
    # A re-created stream that starts earlier repeats 5: dropped; 6 is new.
    assert r.accept([_ev(b"a", 5), _ev(b"c", 6)]) == [_ev(b"c", 6)]
    assert r.next == 7
    assert r.accept([]) == [] and r.next == 7
    with pytest.raises(ValueError):
        Resume(0)


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


def test_compare_to_pb() -> None:
    rpc = load().rpc
    msg = Compare.create(b"k", "==", 0).to_pb(rpc)
    assert msg.key == b"k" and msg.target == rpc.Compare.CREATE and msg.create_revision == 0
    assert Compare.lease(b"k", "==", 7).to_pb(rpc).lease == 7


def test_stubs_live_in_a_private_pool() -> None:
    stubs = load()
    assert stubs.rpc.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert stubs.rpc.DESCRIPTOR.package == "etcdserverpb"
    assert stubs.rpc.DESCRIPTOR.services_by_name["KV"].full_name == "etcdserverpb.KV"


def test_strip_annotations() -> None:
    text = (
        'syntax = "proto3";\nimport "gogoproto/gogo.proto";\n'
        "option (gogoproto.marshaler_all) = true;\n"
        'import "etcd/mvcc/mvccpb/kv.proto";\nservice S {\n  rpc A(R) returns (R) {\n'
        '      option (google.api.http) = {\n        post: "/a"\n'
        '        additional_bindings {\n            post: "/b"\n        }\n    };\n  }\n}\n'
    )
    out = strip_annotations(text)
    assert "gogoproto" not in out and "google.api" not in out
    assert 'import "mvccpb/kv.proto";' in out
    assert "rpc A(R) returns (R) {\n  }" in out


def _etcd(**kw: object) -> SimpleNamespace:
    base: dict[str, object] = {
        "endpoints": ["http://127.0.0.1:2379"],
        "tls": None,
        "auth": None,
        "dial_timeout": 2.0,
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_settings_credentials_from_environment_win() -> None:
    auth = SimpleNamespace(user="cfg", password_file=None)
    env = {"HALB_ETCD_USER": "envuser", "HALB_ETCD_PASSWORD": "pw"}
    st = ClientSettings.of(_etcd(auth=auth), environ=env)
    assert (st.user, st.password) == ("envuser", "pw")
    with pytest.raises(ValueError, match=r"etcd\.auth: user 'cfg' has no password"):
        ClientSettings.of(_etcd(auth=auth), environ={})


def test_an_attempt_never_takes_more_than_half_a_call() -> None:
    st = ClientSettings(("http://127.0.0.1:2379",))
    assert st.attempt_per(2.0) == pytest.approx(0.3)  # PLATFORM.md's 0.3 s per attempt
    assert st.attempt_per(0.25) == pytest.approx(0.125)  # a heartbeat-sized call: two tries


def test_missing_etcd_stubs_are_refused_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from halb.etcd import proto

    monkeypatch.setattr(proto, "_loaded", None)
    monkeypatch.setattr(proto, "default_out_dir", lambda: tmp_path / "_etcdproto")
    with pytest.raises(proto.StaleStubsError, match=r"missing .*python -m halb.build"):
        proto.load()
    assert not (tmp_path / "_etcdproto").exists()  # refused, never generated
