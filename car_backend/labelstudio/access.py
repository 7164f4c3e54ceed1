"""`Access`: what the Label Studio layer needs to know to reach Label Studio and fetch media.

A structural type: `car_backend.settings.Settings` satisfies it, and so does any object with these fields,
so this package never imports the service's settings.
"""

from __future__ import annotations

from typing import Protocol


class Access(Protocol):
    label_studio_url: str  # "" when unset; http(s)://host[:port][/prefix]
    label_studio_api_key: str  # personal access token, access token or legacy token; "" when unset
    allowed_hosts: tuple[str, ...]  # hosts besides Label Studio's that images may come from
    max_image_pixels: int
    max_download_bytes: int
    download_timeout: float  # seconds one image download may take in all, redirects and retries included
