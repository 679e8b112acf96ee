"""Build the kvmdm test guests (``python -m guests.build NAME``): the recipe lives in
:mod:`kvmcore.util.guest_build`, below the daemon that builds the demo guest; this module keeps the guests'
entry point and names."""

from __future__ import annotations

import sys

from kvmcore.util.guest_build import (
    AS_FLAGS,
    DEMO_SOURCE,
    LD_FLAGS,
    LINKER_SCRIPT,
    RECIPE_VERSION,
    RUNTIME_DIR,
    RUNTIME_INCLUDES,
    RUNTIME_SOURCES,
    STANDALONE_MARKER,
    TEST_GUESTS_DIR,
    TOOL_TIMEOUT_S,
    GuestBuildError,
    build_demo,
    build_guest,
    default_out_dir,
    guest_names,
    is_standalone,
    main,
    resolve_source,
)

__all__ = [
    "AS_FLAGS", "DEMO_SOURCE", "LD_FLAGS", "LINKER_SCRIPT", "RECIPE_VERSION", "RUNTIME_DIR", "RUNTIME_INCLUDES",
    "RUNTIME_SOURCES", "STANDALONE_MARKER", "TEST_GUESTS_DIR", "TOOL_TIMEOUT_S", "GuestBuildError", "build_demo",
    "build_guest", "default_out_dir", "guest_names", "is_standalone", "main", "resolve_source",
]

if __name__ == "__main__":
    sys.exit(main())
