"""Fixtures shared by the KVM-layer tests: a small host, its Kvm and a DEFAULT VM."""

from __future__ import annotations

import pytest

from tdxcore.constants import VmType
from tdxcore.kvm import Kvm
from tdxcore.module.host import Host


@pytest.fixture
def host():
    """A one-CPU host with 8 MiB of memory (enough frames for the guest_memfd cases)."""
    return Host(packages=1, cpus_per_package=1, memory=8 << 20)


@pytest.fixture
def kvm(host):
    """The KVM of that host."""
    return Kvm(host)


@pytest.fixture
def vm(kvm):
    """A DEFAULT VM (type 0), the type the real-kernel comparison uses."""
    return kvm.create_vm(VmType.DEFAULT)
