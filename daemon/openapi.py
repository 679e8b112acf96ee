"""The OpenAPI 3.0 document served at ``GET /openapi.json``; it describes exactly what :mod:`daemon.api` does
(tests run schemathesis against it, so a drift between the two fails CI)."""

from __future__ import annotations

from typing import Any

from daemon.config import (
    BACKENDS,
    MAX_CMDLINE,
    MAX_DISKS,
    MAX_NICS,
    MAX_RESTARTS_RANGE,
    MEMORY_RANGE,
    RESTART_POLICIES,
    RESTART_WINDOW_RANGE,
    VCPUS_RANGE,
)

ACTIONS = ("start", "stop", "kill", "pause", "resume", "reset")
GUEST_STATES = ["stopped", "starting", "running", "paused", "stopping", "restarting", "crashed", "failed"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": _ref("Error")}}}


def _json(desc: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
              "description": "Guest name"}
TAIL_PARAM = {"name": "tail", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 0, "maximum": 8 << 20},
              "description": "Return at most this many bytes from the end of the console log (default 65536)"}

_DEF_PROPS: dict[str, Any] = {
    "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
    "vcpus": {"type": "integer", "minimum": VCPUS_RANGE[0], "maximum": VCPUS_RANGE[1], "default": 1},
    "memory_mib": {"type": "integer", "minimum": MEMORY_RANGE[0], "maximum": MEMORY_RANGE[1], "default": 128},
    "kernel": {"type": "string", "description": 'Absolute path of the kernel image, or "demo" (required unless '
                                                "firmware is given)"},
    "firmware": {"type": "string", "nullable": True,
                 "description": '"seabios" (Debian\'s bios-256k.bin) or the absolute path of a BIOS image: boot the '
                                "PC through it from its disks instead of loading a kernel (excludes kernel, initrd, "
                                "cmdline)"},
    "nic_rom": {"type": "string", "nullable": True,
                "description": '"ipxe" (Debian\'s ipxe-qemu efi-virtio.rom) or the absolute path of a PCI option '
                               "ROM the BIOS runs for every virtio-net nic (firmware only)"},
    "boot_order": {"type": "array", "maxItems": MAX_DISKS + MAX_NICS,
                   "items": {"type": "string", "pattern": "^(disk|nic)(0|[1-9][0-9]?)$"},
                   "description": 'Firmware boot order, e.g. ["disk0", "nic0"] (default: every disk in order)'},
    "initrd": {"type": "string", "nullable": True},
    "cmdline": {"type": "string", "maxLength": MAX_CMDLINE, "default": ""},
    "disks": {"type": "array", "maxItems": MAX_DISKS, "items": {
        "type": "object", "additionalProperties": False, "required": ["path"],
        "properties": {
            "path": {"type": "string"},
            "read_only": {"type": "boolean", "default": False},
            "serial": {"type": "string", "maxLength": 20, "default": ""},
            "backend": {"type": "string", "enum": list(BACKENDS), "default": "inline",
                        "description": 'vhost-user: "path" is an image (regular file or block device) served by '
                                       "a daemon-managed kvmdm-backend process, or the unix socket of an "
                                       "external back-end (e.g. qemu-storage-daemon)"},
        }}},
    "nics": {"type": "array", "maxItems": MAX_NICS, "items": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "mac": {"type": "string", "pattern": "^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"},
            "tap": {"type": "string", "nullable": True, "maxLength": 15},
            "bridge": {"type": "string", "nullable": True, "maxLength": 15},
            "backend": {"type": "string", "enum": list(BACKENDS), "default": "inline",
                        "description": "vhost-user: a daemon-managed kvmdm-backend net process on the tap"},
        }}},
    "restart": {"type": "string", "enum": list(RESTART_POLICIES), "default": "on-failure"},
    "max_restarts": {"type": "integer", "minimum": MAX_RESTARTS_RANGE[0], "maximum": MAX_RESTARTS_RANGE[1],
                     "default": 5},
    "restart_window_s": {"type": "integer", "minimum": RESTART_WINDOW_RANGE[0],
                         "maximum": RESTART_WINDOW_RANGE[1], "default": 60},
    "jail": {"type": "object", "additionalProperties": False,
             "properties": {"enabled": {"type": "boolean", "default": True}}},
    "rng": {"type": "boolean", "default": False, "description": "Attach a virtio-rng device (getrandom)"},
    "console2": {"type": "boolean", "default": False,
                 "description": 'Attach a virtio-console; its lines go to the console log prefixed "[hvc0] "'},
}

_INFO_PROPS: dict[str, Any] = {
    "name": {"type": "string"},
    "state": {"type": "string", "enum": GUEST_STATES},
    "dm_pid": {"type": "integer", "nullable": True},
    "uptime_s": {"type": "number", "nullable": True},
    "last_exit_reason": {"type": "string", "nullable": True},
    "last_exit_code": {"type": "integer", "nullable": True},
    "guest_status": {"type": "integer", "nullable": True},
    "restarts": {"type": "integer", "minimum": 0},
    "uid": {"type": "integer", "nullable": True},
    # The DM's latest state-event reason, e.g. "Block (PCI slot 1) needs reset: vhost-user back-end disconnected".
    "last_event": {"type": "string", "nullable": True},
    # Daemon-managed vhost-user back-ends (disks whose path is an image, vhost-user nics); external ones absent.
    "backends": {"type": "array", "items": {
        "type": "object", "required": ["device", "kind", "pid", "state", "restarts", "last_exit_reason"],
        "properties": {
            "device": {"type": "integer", "minimum": 0, "description": "vhost-user device index (disks, then nics)"},
            "kind": {"type": "string", "enum": ["blk", "net"]},
            "pid": {"type": "integer", "nullable": True},
            "state": {"type": "string", "enum": ["starting", "running", "restarting", "stopped", "failed"]},
            "restarts": {"type": "integer", "minimum": 0},
            "last_exit_reason": {"type": "string", "nullable": True}}}},
}

_COUNTERS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "string"}}}},
    "GuestDefinition": {"type": "object", "additionalProperties": False, "required": ["name"],
                        "properties": _DEF_PROPS},
    "GuestInfo": {"type": "object", "required": list(_INFO_PROPS), "properties": _INFO_PROPS},
    "Guest": {"allOf": [_ref("GuestInfo"), {"type": "object", "required": ["definition"],
                                            "properties": {"definition": _ref("GuestDefinition")}}]},
    "GuestList": {"type": "object", "required": ["guests"],
                  "properties": {"guests": {"type": "array", "items": _ref("Guest")}}},
    "Health": {"type": "object", "required": ["status", "version", "pid", "uptime_s", "guests", "store_errors"],
               "properties": {
                   "status": {"type": "string", "enum": ["ok"]},
                   "version": {"type": "string"},
                   "pid": {"type": "integer"},
                   "uptime_s": {"type": "number"},
                   "guests": {"type": "array", "items": _ref("GuestInfo")},
                   "store_errors": {"type": "array", "items": {
                       "type": "object", "required": ["path", "error"],
                       "properties": {"path": {"type": "string"}, "error": {"type": "string"}}}}}},
    "Stats": {"type": "object", "required": ["state", "uptime_s", "exits", "devices", "rss_bytes", "vcpus"],
              "properties": {
                  "state": {"type": "string", "enum": ["starting", "running", "paused", "stopped", "crashed"]},
                  "uptime_s": {"type": "number", "minimum": 0},
                  "exits": _COUNTERS,
                  "devices": {"type": "object", "additionalProperties": _COUNTERS},
                  "rss_bytes": {"type": "integer", "minimum": 0},
                  "vcpus": {"type": "integer", "minimum": 0}}},
    "Events": {"type": "object", "required": ["events"], "properties": {"events": {"type": "array", "items": {
        "type": "object", "required": ["time", "event"],
        "properties": {"time": {"type": "number"}, "event": {"type": "string"}}}}}},
    "ConsoleInput": {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
                     "properties": {"data": {"type": "string", "format": "byte",
                                             "description": "base64, at most 4096 bytes decoded"},
                                    "text": {"type": "string"}}},
}

_GUEST_OK = _json("The guest after the operation", _ref("Guest"))
_NOT_FOUND = _err("No such guest")
_CONFLICT = _err("Not possible in the guest's current state")
_DM_ERRORS = {"502": _err("The DM answered something invalid"), "504": _err("The DM did not answer in time")}


def _action_op(action: str) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": _GUEST_OK, "404": _NOT_FOUND, "409": _CONFLICT}
    params: list[dict[str, Any]] = [NAME_PARAM]
    if action == "start":
        responses["422"] = _err("The guest cannot be started (missing image, DM failed to come up)")
    if action == "stop":
        params.append({"name": "timeout", "in": "query", "required": False,
                       "schema": {"type": "number", "minimum": 0, "maximum": 300},
                       "description": "Seconds to wait for a graceful stop before SIGKILL (default 10)"})
        responses["400"] = _err("Bad query parameter")
    if action in ("pause", "resume", "reset"):
        responses.update(_DM_ERRORS)
    summary = {"start": "Spawn the guest's DM", "stop": "Stop gracefully (SIGKILL after timeout)",
               "kill": "SIGKILL the DM", "pause": "Pause the vCPUs", "resume": "Resume the vCPUs",
               "reset": "Reset the guest"}[action]
    return {"post": {"operationId": f"{action}Guest", "summary": summary, "parameters": params,
                     "responses": responses}}


def document(version: str) -> dict[str, Any]:
    text = {"description": "Console bytes", "content": {"text/plain": {"schema": {"type": "string"}}}}
    paths: dict[str, Any] = {
        "/health": {"get": {"operationId": "health", "summary": "Daemon and guest health",
                            "responses": {"200": _json("Health", _ref("Health"))}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text format 0.0.4",
                             "responses": {"200": {"description": "Metrics", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                  "responses": {"200": _json("OpenAPI 3.0 document", {"type": "object"})}}},
        "/v1/guests": {
            "get": {"operationId": "listGuests", "responses": {"200": _json("All guests", _ref("GuestList"))}},
            "post": {"operationId": "createGuest", "summary": "Define a guest",
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": _ref("GuestDefinition")}}},
                     "responses": {"201": _json("Created", _ref("Guest")),
                                   "400": _err("Malformed JSON"), "409": _err("Guest exists"),
                                   "413": _err("Body too large"), "415": _err("Not JSON"),
                                   "422": _err("Invalid definition")}},
        },
        "/v1/guests/{name}": {
            "get": {"operationId": "getGuest", "parameters": [NAME_PARAM],
                    "responses": {"200": _json("The guest", _ref("Guest")), "404": _NOT_FOUND}},
            "delete": {"operationId": "destroyGuest", "summary": "Kill the DM if running, remove everything",
                       "parameters": [NAME_PARAM],
                       "responses": {"200": _json("Deleted", {"type": "object", "required": ["deleted"],
                                                              "properties": {"deleted": {"type": "string"}}}),
                                     "404": _NOT_FOUND}},
        },
        "/v1/guests/{name}/stats": {"get": {
            "operationId": "guestStats", "parameters": [NAME_PARAM],
            "responses": {"200": _json("DM statistics", _ref("Stats")), "404": _NOT_FOUND, "409": _CONFLICT,
                          **_DM_ERRORS}}},
        "/v1/guests/{name}/events": {"get": {
            "operationId": "guestEvents", "parameters": [NAME_PARAM],
            "responses": {"200": _json("Lifecycle events (newest last)", _ref("Events")), "404": _NOT_FOUND}}},
        "/v1/guests/{name}/console": {
            "get": {"operationId": "consoleTail", "parameters": [NAME_PARAM, TAIL_PARAM],
                    "responses": {"200": text, "400": _err("Bad query parameter"), "404": _NOT_FOUND}},
            "post": {"operationId": "consoleInput", "parameters": [NAME_PARAM],
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": _ref("ConsoleInput")}}},
                     "responses": {"200": _json("Written", {"type": "object", "required": ["written"],
                                                            "properties": {"written": {"type": "integer"}}}),
                                   "400": _err("Malformed JSON"), "404": _NOT_FOUND, "409": _CONFLICT,
                                   "413": _err("Too large"), "415": _err("Not JSON"),
                                   "422": _err("Invalid body"), **_DM_ERRORS}},
        },
        "/v1/guests/{name}/console/stream": {"get": {
            "operationId": "consoleStream", "summary": "Chunked stream following the console log",
            "parameters": [NAME_PARAM, TAIL_PARAM,
                           {"name": "max_s", "in": "query", "required": False,
                            "schema": {"type": "number", "minimum": 0, "maximum": 86400},
                            "description": "End the stream after this many seconds (default: never)"}],
            "responses": {"200": text, "400": _err("Bad query parameter"), "404": _NOT_FOUND}}},
    }
    for action in ACTIONS:
        paths[f"/v1/guests/{{name}}/{action}"] = _action_op(action)
    return {
        "openapi": "3.0.3",
        "info": {"title": "kvmdmd", "version": version,
                 "description": "KVM device-model daemon. Unix socket (mode 0660) or loopback TCP with a bearer "
                                "token."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
