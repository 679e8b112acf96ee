"""Re-export: the rate-limited log lives in :mod:`kvmcore.util.ratelimit` (devices and pv both use it)."""

from kvmcore.util.ratelimit import RateLimitedLog

__all__ = ["RateLimitedLog"]
