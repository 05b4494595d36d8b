"""Checks of the deploy files that need no machines: ansible-lint (production profile)
over the roles and playbooks, and `vagrant validate` of the Vagrantfile."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from halbd_site import ANSIBLE_DIR, TOP


def test_ansible_lint_production_profile(ansible_tools: Path) -> None:
    r = subprocess.run(
        [str(ansible_tools / "ansible-lint"), "--offline", "--profile", "production", "--nocolor"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PATH": f"{ansible_tools}:{os.environ.get('PATH', '')}"},
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Profile 'production' was required, and it passed" in out, out[-2000:]


def test_vagrantfile_validates() -> None:
    if shutil.which("vagrant") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("vagrant is not installed (scripts/setup installs it)", pytrace=False)
        pytest.skip("vagrant is not installed")
    r = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=TOP / "vagrant",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Vagrantfile validated successfully" in r.stdout
    # Every machine of the site is defined, and provisioned by the same site.yml.
    text = (TOP / "vagrant/Vagrantfile").read_text()
    for name in ("lb1", "lb2", "be1", "be2", "be3", "client", "etcd1", "etcd2", "etcd3"):
        assert f'"{name}"' in text
    assert 'a.playbook = "../deploy/ansible/site.yml"' in text
