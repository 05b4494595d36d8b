"""The deploy tier: nine systemd-nspawn machines (two balancers, three backends, a
client, three etcd members) provisioned by deploy/ansible/site.yml over ssh, once per
session; the tests drill the deployed cluster. Without its tools the tier skips locally
and fails under CI=true (scripts/setup installs them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from halbd_machines import Fabric, ssh_key
from halbd_site import ANSIBLE_DIR, ANSIBLE_VENV, SUBNET, TOP, Site, machines

TOOLS = ("mmdebstrap", "systemd-nspawn", "ssh", "/usr/sbin/apt-cacher-ng")


def _missing() -> list[str]:
    out = [t for t in TOOLS if shutil.which(t) is None]
    if not (ANSIBLE_VENV / "bin/ansible-playbook").exists():
        out.append(f"{ANSIBLE_VENV}/bin/ansible-playbook (scripts/setup makes it)")
    return out


def _need_tools() -> None:
    missing = _missing()
    if missing:
        reason = f"deploy tier needs {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"deploy tier cannot run in CI: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def ansible_tools() -> Path:
    _need_tools()
    return ANSIBLE_VENV / "bin"


# Module-scoped: the machines go as soon as test_site.py is done, not at the end of the
# session (nine booted machines would load the tiers that run after it).
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    _need_tools()
    work = tmp_path_factory.mktemp("halbd")
    t0 = time.monotonic()
    wheelhouse = work / "wheelhouse"
    subprocess.run(
        [str(TOP / "deploy/build-wheelhouse"), str(wheelhouse)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fabric = Fabric(SUBNET)
    fabric.teardown()  # what an interrupted run left
    s = Site(fabric, work, wheelhouse)
    try:
        fabric.up(machines())
        s.write_inventory(ssh_key())
        booted = time.monotonic()
        first = s.playbook(ANSIBLE_DIR / "site.yml", log="site-1")
        assert first.rc == 0 and first.failed and not any(first.failed.values()), first.output[
            -6000:
        ]
        app = s.playbook(Path(__file__).with_name("backend_app.yml"), log="backend-app")
        assert app.rc == 0, app.output[-4000:]
        s.timings = {  # type: ignore[attr-defined]
            "wheelhouse_and_boot_s": round(booted - t0, 1),
            "site_first_run_s": round(time.monotonic() - booted, 1),
        }
        s.first_run = first  # type: ignore[attr-defined]
        yield s
    finally:
        if os.environ.get("HALB_DEPLOY_KEEP") != "1":
            fabric.teardown()
