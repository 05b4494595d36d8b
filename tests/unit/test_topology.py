from __future__ import annotations

import pytest

from halb.lab.topology import MAX_BACKENDS, MAX_NODES, LabSite, plan


def test_addresses_macs_and_names_are_unique_and_fit() -> None:
    p = plan(MAX_NODES, MAX_BACKENDS)
    macs = [lk.mac for h in p.hosts for lk in h.links]
    addrs = [a for h in p.hosts for lk in h.links for a in lk.addresses]
    peers = [lk.peer for h in p.hosts for lk in h.links]
    assert len(set(macs)) == len(macs)
    assert len(set(addrs)) == len(addrs)
    assert len(set(peers)) == len(peers)
    assert all(len(x) <= 15 for x in peers + list(p.namespaces))
    assert p.vip not in {a.split("/")[0] for a in addrs}


def test_defaults_are_two_nodes_three_backends() -> None:
    p = plan()
    assert [h.namespace for h in p.nodes] == ["halb-lb1", "halb-lb2"]
    assert [h.namespace for h in p.backends] == ["halb-be1", "halb-be2", "halb-be3"]
    assert p.client.address == "10.99.0.2"


@pytest.mark.parametrize(("nodes", "backends"), [(0, 3), (10, 3), (2, 0), (2, 51)])
def test_sizes_out_of_range_are_refused(nodes: int, backends: int) -> None:
    with pytest.raises(ValueError, match="must be between"):
        plan(nodes, backends)


def test_instances_do_not_share_names_addresses_or_dirs() -> None:
    a, b = plan(site=LabSite(0)), plan(site=LabSite(3))
    assert set(a.namespaces).isdisjoint(b.namespaces)
    assert all(LabSite(3).owns(ns) and not LabSite(0).owns(ns) for ns in b.namespaces)
    assert all(LabSite(0).owns(ns) and not LabSite(3).owns(ns) for ns in a.namespaces)
    addrs = {x for p in (a,) for h in p.hosts for lk in h.links for x in lk.addresses}
    assert addrs.isdisjoint({x for h in b.hosts for lk in h.links for x in lk.addresses})
    assert (a.vip, b.vip) == ("10.99.0.100", "10.96.0.100")
    assert a.lab_dir != b.lab_dir and a.site.host_link != b.site.host_link
    assert b.site.ns("lb1") == "halb-3-lb1" and b.site.ns("halb-3-lb1") == "halb-3-lb1"


@pytest.mark.parametrize("bad", [-1, 10])
def test_instance_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="instance"):
        LabSite(bad)
