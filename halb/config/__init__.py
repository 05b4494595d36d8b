"""Cluster configuration: schema, loading, validation with field-path errors.

One YAML file describes a whole cluster. Every error names the exact field path
(``vip_groups[0].vips[1].services[0].backends[2].address``) so an operator can fix it
without guessing. Structural errors come from pydantic (``schema``, ``types``); the
semantic checks that need the whole document (duplicates, dataplane capabilities,
priorities, subnets, timing) run after (``checks``, ``capabilities``); ``load`` ties
them together.
"""

from __future__ import annotations

from halb.config.capabilities import (
    DEADMAN_DATAPLANES,
    MIN_LEASE_TTL,
    SUPPORTED_FORWARDING,
    SUPPORTED_SCHEDULERS,
)
from halb.config.errors import ConfigError, ConfigIssue
from halb.config.load import dump_config, load_config, parse_config, parse_config_text
from halb.config.schema import (
    AnnounceConfig,
    BackendConfig,
    ClusterConfig,
    DampingConfig,
    DataplaneConfig,
    EtcdAuth,
    EtcdConfig,
    EtcdTls,
    FailoverConfig,
    FlowTimeoutsConfig,
    HealthCheckConfig,
    HealthConfig,
    NatConfig,
    NodeConfig,
    ServiceConfig,
    ServiceTlsConfig,
    TlsFiles,
    VipConfig,
    VipGroupConfig,
    VirtualMacConfig,
    group_services,
)

__all__ = [
    "DEADMAN_DATAPLANES",
    "MIN_LEASE_TTL",
    "SUPPORTED_FORWARDING",
    "SUPPORTED_SCHEDULERS",
    "AnnounceConfig",
    "BackendConfig",
    "ClusterConfig",
    "ConfigError",
    "ConfigIssue",
    "DampingConfig",
    "DataplaneConfig",
    "EtcdAuth",
    "EtcdConfig",
    "EtcdTls",
    "FailoverConfig",
    "FlowTimeoutsConfig",
    "HealthCheckConfig",
    "HealthConfig",
    "NatConfig",
    "NodeConfig",
    "ServiceConfig",
    "ServiceTlsConfig",
    "TlsFiles",
    "VipConfig",
    "VipGroupConfig",
    "VirtualMacConfig",
    "dump_config",
    "group_services",
    "load_config",
    "parse_config",
    "parse_config_text",
]
