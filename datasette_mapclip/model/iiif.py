"""IIIF Image API URLs: ask for a derivative sized for the model instead of the full scan.

The seed fetched ``full/pct:100`` (often 2000+ px) to crop 224 px from the middle; a
``!512,512`` derivative is ~10x fewer bytes and decodes ~6x faster (measured on a 2-core machine).
"""

from __future__ import annotations

import re
import urllib.parse

from ..settings import settings_of

# {service}/{region}/{size}/{rotation}/{quality}.{format}  (IIIF Image API 2 and 3)
_IIIF_IMAGE = re.compile(
    r"^(?P<service>https?://.+?)/(?P<region>full|square|\d+,\d+,\d+,\d+|pct:[\d.,]+)/"
    r"(?P<size>[^/]+)/(?P<rotation>!?\d+(?:\.\d+)?)/(?P<quality>default|color|gray|bitonal|native)\.(?P<format>\w+)$"
)

DEFAULT_SIZE = 512
THUMBNAIL_SIZE = 256


def strip_fragment(url: str) -> str:
    return url.split("#", 1)[0]


def service_url(url: str) -> str | None:
    """The image service base of a IIIF image URL, or None if the URL is not one."""
    match = _IIIF_IMAGE.match(strip_fragment(url))
    return match.group("service") if match else None


def is_iiif_image(url: str) -> bool:
    return service_url(url) is not None


def sized(url: str, size: int = DEFAULT_SIZE) -> str:
    """The same image, whole, scaled to fit a size x size box (``full/!s,s/0/default.jpg``).

    Non-IIIF URLs come back unchanged (minus any ``#h=..&w=..`` fragment).
    """
    service = service_url(url)
    if service is None:
        return strip_fragment(url)
    return f"{service}/full/!{size},{size}/0/default.jpg"


def from_service(service: str, size: int = DEFAULT_SIZE) -> str:
    return f"{service.rstrip('/')}/full/!{size},{size}/0/default.jpg"


def canonical(url: str) -> str:
    """One key per image, whatever derivative a source names: ``{service}/full/pct:100/0/default.jpg``.

    The seed's file list uses this form, loc.gov search results name ``pct:12.5``/``pct:25``
    derivatives of the same image; keying on the canonical form keeps one row per sheet.
    """
    service = service_url(url)
    return f"{service}/full/pct:100/0/default.jpg" if service else strip_fragment(url)


# -- which image services a map's page may open in the deep-zoom viewer -----------------------

# Allowed without configuration: the Library of Congress (loc.gov and its subdomains, where
# tile.loc.gov serves the images), and the hosts of the URLs the collection's loads started from
# (``loads.command``, e.g. ``load loc https://...``).  ``iiif_hosts`` in the plugin's settings
# replaces both.
DEFAULT_IIIF_DOMAINS = ("loc.gov",)
_LOADED_URL = re.compile(r"https?://[^\s'\"<>]+", re.IGNORECASE)
MAX_LOADS_READ = 1000
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_and_port(url: str) -> tuple[str, str] | None:
    """(host, "host:port" or the host alone on the scheme's default port) of an http(s) URL."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower()
    return host, (f"{host}:{port}" if port is not None and port != _DEFAULT_PORTS[scheme] else host)


def host_allowed(url: str | None, allowed) -> bool:
    """Whether an http(s) URL's host is one of ``allowed``: an entry ``example.org`` allows that host
    and its subdomains on any port, ``example.org:8182`` that host on that port only."""
    found = _host_and_port(url) if isinstance(url, str) else None
    if found is None:
        return False
    host, host_port = found
    for entry in allowed:
        entry = str(entry).strip().lower().rstrip(".")
        if not entry:
            continue
        if ":" in entry:
            if host_port == entry:
                return True
        elif host == entry or host.endswith("." + entry):
            return True
    return False


def allowed_hosts(config: dict, load_commands=()) -> list[str]:
    """The IIIF image hosts a map's page may open: the ``iiif_hosts`` setting (a list of hosts), else
    the defaults above."""
    configured = settings_of(config).iiif_hosts
    if configured is not None:
        return configured
    hosts = list(DEFAULT_IIIF_DOMAINS)
    for command in load_commands:
        for url in _LOADED_URL.findall(command or ""):
            found = _host_and_port(url)
            if found and found[1] not in hosts:
                hosts.append(found[1])
    return hosts
