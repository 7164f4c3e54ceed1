"""The fake Label Studio: see car_backend.testing.fake_label_studio (shared with the benchmarks)."""

from car_backend.testing.fake_label_studio import (
    PAT,
    FakeLabelStudio,
    Reply,
    Seen,
    image_bytes,
    make_access_token,
    query,
)

__all__ = ["PAT", "FakeLabelStudio", "Reply", "Seen", "image_bytes", "make_access_token", "query"]
