"""Settings for tests: see car_backend.testing.settings (shared with the benchmarks)."""

from car_backend.testing.settings import TINY_CLIP_CONFIG, TINY_MODEL, settings_env, tiny_settings

__all__ = ["TINY_CLIP_CONFIG", "TINY_MODEL", "settings_env", "tiny_settings"]
