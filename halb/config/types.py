"""Scalar field types with operator-friendly messages (addresses, names, MACs, endpoints)
and the strict base model every config section uses."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)
from pydantic_core import PydanticCustomError

from halb.model import (
    IPAddress,
)

__all__ = [
    "IP",
    "Endpoint",
    "HostPort",
    "IPInterface",
    "Mac",
    "Model",
    "Name",
    "Port",
    "Seconds",
]


_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


# --- scalar types with operator-friendly messages -------------------------------------


def _err(kind: str, message: str) -> PydanticCustomError:
    # The message is a template to pydantic: pass user text through the context so
    # braces in it are never interpreted.
    return PydanticCustomError(kind, "{msg}", {"msg": message})


def _ip(value: Any) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise _err("ip_address", f"{value!r} is not an IP address") from None


def _ip_interface(value: Any) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return value
    text = str(value)
    if "/" not in text:
        raise _err(
            "ip_interface", f"{value!r} needs a prefix length (address/prefix, e.g. 10.0.0.11/24)"
        )
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise _err("ip_interface", f"{value!r} is not an address/prefix") from None


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise _err(
            "name",
            f"{value!r} is not a valid name (lower-case letters, digits and '-', "
            f"at most 63 characters)",
        )
    return value


def _mac(value: Any) -> str:
    text = str(value).lower()
    if not _MAC_RE.match(text):
        raise _err("mac", f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return text


def _hostport(value: Any) -> str:
    text = str(value)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536 and bool(host)
    if ok:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            ok = bool(re.match(r"^[A-Za-z0-9.-]+$", host))
    if not ok:
        raise _err("host_port", f"{value!r} is not host:port")
    return text


def _endpoint(value: Any) -> str:
    text = str(value)
    m = re.match(r"^(https?)://(.+)$", text)
    if not m:
        raise _err(
            "endpoint", f"{value!r} is not an etcd endpoint (http://host:port or https://host:port)"
        )
    _hostport(m.group(2))
    return text


IP = Annotated[IPAddress, BeforeValidator(_ip)]
IPInterface = Annotated[
    ipaddress.IPv4Interface | ipaddress.IPv6Interface, BeforeValidator(_ip_interface)
]
Name = Annotated[str, BeforeValidator(_name)]
Mac = Annotated[str, BeforeValidator(_mac)]
HostPort = Annotated[str, BeforeValidator(_hostport)]
Endpoint = Annotated[str, BeforeValidator(_endpoint)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)
