"""The OpenAPI document of the REST API (served at /openapi.json)."""

from .. import __version__

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_SID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
_PATH = {"name": "path", "in": "query", "schema": {"type": "string"}, "description": "relative to the guest home"}


def _json(ref: str, description: str = "ok") -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _errors(*codes: int) -> dict:
    return {str(code): _ERROR for code in (401, *codes)}


# Code contexts (server/contexts.py, sessions/contexts.py).
_CTX = {"name": "context_id", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "a context's id (`default`: the session's own kernel)"}
_CONTEXT_SCHEMAS = {
    "Context": {"type": "object", "required": ["id", "language", "cwd"], "properties": {
        "id": {"type": "string"}, "language": {"type": "string"}, "cwd": {"type": "string"}}},
    "ContextCreate": {"type": "object", "properties": {
        "language": {"type": "string", "default": "python", "description": "one of the template's kernels"},
        "cwd": {"type": "string", "default": "/root", "description": "absolute; made if missing"}}},
    "Contexts": {"type": "object", "properties": {
        "contexts": {"type": "array", "items": {"$ref": "#/components/schemas/Context"}}}},
}
_CONTEXT_PATHS = {
    "/sessions/{session_id}/contexts": {
        "parameters": [_SID],
        "get": {"summary": "the session's code contexts, its default first",
                "responses": {"200": _json("Contexts"), **_errors(404, 410)}},
        "post": {"summary": "a new code context: its own kernel in the session's VM (own variables and cwd, the "
                            "same files); 409 past the per-session limit",
                 "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ContextCreate"}}}},
                 "responses": {"201": _json("Context", "created"), **_errors(400, 404, 409, 410)}}},
    "/sessions/{session_id}/contexts/{context_id}": {
        "parameters": [_SID, _CTX],
        "get": {"summary": "one context", "responses": {"200": _json("Context"), **_errors(404, 410)}},
        "delete": {"summary": "remove it (its kernel is stopped; the default cannot be: 400)",
                   "responses": {"204": {"description": "removed"}, **_errors(400, 404, 410)}}},
    "/sessions/{session_id}/contexts/{context_id}/restart": {"parameters": [_SID, _CTX], "post": {
        "summary": "a fresh kernel for the context (its variables are lost)",
        "responses": {"200": _json("Context"), **_errors(404, 410)}}},
    "/sessions/{session_id}/contexts/{context_id}/interrupt": {"parameters": [_SID, _CTX], "post": {
        "summary": "interrupt the context's running cell", "responses": {"204": {"description": "sent"},
                                                                         **_errors(404, 410)}}},
}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "vmcell", "version": __version__,
             "description": "Code-interpreter sessions, each in its own microVM restored from a warm snapshot."},
    "components": {
        "securitySchemes": {"token": {"type": "apiKey", "in": "header", "name": "Authorization",
                                      "description": "`token <T>` or `Bearer <T>` (also `?token=<T>`)"}},
        "schemas": {
            "Error": {"type": "object", "required": ["reason", "message"],
                      "properties": {"reason": {"type": "string"}, "message": {"type": "string"},
                                     "error": {"type": "string", "description": "vmcell's error type, e.g. "
                                               "SessionClosed, VMDied, KernelDied, MemoryLimitExceeded, GuestProtocolError"}}},
            "SessionCreate": {"type": "object", "properties": {
                "template": {"type": "string", "default": "python"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "lifetime": {"type": "number", "description": "seconds until the session is closed"},
                "idle_timeout": {"type": "number", "description": "seconds without use before it is closed"},
                "network": {"$ref": "#/components/schemas/Network"}}},
            "Network": {"type": "object", "nullable": True, "required": ["allow"], "description": (
                "Egress through the host's allow-list proxy (the guest has no NIC; HTTP_PROXY/HTTPS_PROXY point "
                "at it). Absent or null: the template's default (none for python); false: none. A name or "
                "*.domain without a port allows 80 and 443; names resolve on the host and loopback, private, "
                "link-local, metadata and other internal addresses are refused unless an entry names that exact "
                "ip:port. `headers` are added to plain-HTTP requests the entry allows (the guest never sees "
                "them; shown redacted). Refusals are 403 with the rule named. docs/network.md"),
                "properties": {"allow": {"type": "array", "maxItems": 256, "items": {"oneOf": [
                    {"type": "string", "description": "host, *.domain, host:port, *.domain:port, ip:port, [v6]:port"},
                    {"type": "object", "required": ["host"], "additionalProperties": False, "properties": {
                        "host": {"type": "string"},
                        "headers": {"type": "object", "additionalProperties": {"type": "string"}}}}]}}}},
            "Session": {"type": "object", "properties": {
                "id": {"type": "string"}, "template": {"type": "string"}, "hostname": {"type": "string"},
                "created_at": {"type": "number"}, "expires_at": {"type": "number", "nullable": True},
                "idle_timeout": {"type": "number", "nullable": True}, "last_activity": {"type": "number"},
                "restore_ms": {"type": "number"}, "alive": {"type": "boolean"}, "accel": {"type": "string"},
                "state": {"type": "string", "enum": ["running", "paused", "saved", "closed", "dead"],
                          "description": "paused: stopped in memory (no CPU); saved: on disk (RAM freed); a "
                                         "request to either resumes it. closed and dead are final."},
                "cause": {"type": "string", "nullable": True, "description": "why it ended"},
                "paused_at": {"type": "number", "nullable": True, "description": "when it was paused or saved"},
                "durable": {"type": "boolean", "description": "kept in the server's state directory (outlives it)"},
                "network": {"$ref": "#/components/schemas/Network",
                            "description": "its allow list, header values redacted; null: no network"},
                "kernel": {"type": "object", "description": "state, execution_state, restarts, last_death; "
                           "memory_max and memory_high (the kernel's memory limit and high-water mark in bytes, as the guest last "
                           "reported them: null until the kernel was restarted or hit its mark), "
                           "oom_kills (kernels the OOM killer killed), memory_interrupts (cells interrupted at the "
                           "mark)"},
                "contexts": {"type": "array", "items": {"$ref": "#/components/schemas/Context"},
                             "description": "its code contexts, the default (its own kernel) first"}}},
            "Fork": {"type": "object", "properties": {
                "count": {"type": "integer", "minimum": 1, "default": 1,
                          "description": "children to make (at most the server's fork limit, and never past its "
                                         "session limit)"},
                "timeout": {"type": "number", "description": "seconds until each child is closed"}}},
            "Sessions": {"type": "object", "properties": {
                "sessions": {"type": "array", "items": {"$ref": "#/components/schemas/Session"}}}},
            "Timeout": {"type": "object", "required": ["timeout"], "properties": {
                "timeout": {"type": "number", "exclusiveMinimum": 0,
                            "description": "seconds from now until the session is closed (sets expires_at)"}}},
            "Execute": {"type": "object", "required": ["code"], "properties": {
                "code": {"type": "string"}, "timeout": {"type": "number"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "context": {"type": "string", "description": "a code context's id (not with `language`)"},
                "language": {"type": "string", "description": "that language's default context: the session's "
                             "kernel for python, another made on first use (not with `context`; 400 if the "
                             "template lacks it)"}}},
            "Result": {"type": "object", "properties": {
                **{k: {"type": "string"} for k in ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex",
                                                   "javascript")},
                "json": {}, "extra": {"type": "object"}, "is_main_result": {"type": "boolean"}}},
            "Execution": {"type": "object", "properties": {
                "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}},
                "logs": {"type": "object", "properties": {"stdout": {"type": "array", "items": {"type": "string"}},
                                                          "stderr": {"type": "array", "items": {"type": "string"}}}},
                "error": {"type": "object", "nullable": True, "properties": {
                    "name": {"type": "string"}, "value": {"type": "string"},
                    "traceback": {"type": "array", "items": {"type": "string"}}}},
                "execution_count": {"type": "integer", "nullable": True}, "duration_ms": {"type": "number"},
                "guest_ms": {"type": "number", "nullable": True}, "truncated": {"type": "boolean"}}},
            **_CONTEXT_SCHEMAS,
        },
    },
    "security": [{"token": []}],
    "paths": {
        "/health": {"get": {"summary": "server status; `templates`: {name: {key, rebuild_pending, planned_key}} of the "
                                       "builds this server restores from (rebuild_pending: their sources changed since)",
                            "responses": {"200": {"description": "ok"}, **_errors()}}},
        "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "ok"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text format); without the token under `vmcell serve "
                                        "--metrics-public`", "responses": {"200": {"description": "ok"}, **_errors()}}},
        "/mcp": {"post": {"summary": "MCP (Model Context Protocol) streamable HTTP, stateless: JSON-RPC in, JSON-RPC "
                                     "as SSE out; tools run_code, create_session, close_session, list_sessions, "
                                     "read_file, write_file, run_command", "responses": {"200": {"description": "ok"},
                                                                                         **_errors()}}},
        "/sessions": {
            "get": {"summary": "list live sessions (running, paused and saved ones)",
                    "responses": {"200": _json("Sessions"), **_errors()}},
            "post": {"summary": "create a session (restores a microVM)",
                     "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/SessionCreate"}}}},
                     "responses": {"201": _json("Session", "created"), **_errors(400, 404, 409)}}},
        "/sessions/{session_id}": {
            "parameters": [_SID],
            "get": {"summary": "one session", "responses": {"200": _json("Session"), **_errors(404, 410)}},
            "delete": {"summary": "close it (the VM is reaped)", "responses": {"204": {"description": "closed"}, **_errors(404, 410)}}},
        "/sessions/{session_id}/execute": {
            "parameters": [_SID],
            "post": {"summary": "run a cell; `Accept: application/x-ndjson` streams events",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Execute"}}}},
                     "responses": {"200": {"description": "the Execution, or NDJSON lines of type stdout, stderr, result, error, "
                                                          "execution_count, keepalive and a final end",
                                           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Execution"}},
                                                       "application/x-ndjson": {"schema": {"type": "string"}}}},
                                   **_errors(400, 404, 410, 429, 502)}}},
        "/sessions/{session_id}/interrupt": {"parameters": [_SID], "post": {
            "summary": "interrupt the running cell", "responses": {"204": {"description": "sent"}, **_errors(404, 410)}}},
        "/sessions/{session_id}/restart": {"parameters": [_SID], "post": {
            "summary": "restart the kernel (variables are lost)", "responses": {"200": _json("Session"), **_errors(404, 410)}}},
        "/sessions/{session_id}/pause": {"parameters": [_SID], "post": {
            "summary": "save it to disk and free its RAM (state saved); any later request on it (a cell, files, a "
                       "websocket, resume) brings it back with its variables and files",
            "responses": {"200": _json("Session"), **_errors(404, 410)}}},
        "/sessions/{session_id}/resume": {"parameters": [_SID], "post": {
            "summary": "bring a paused or saved session back to running (a no-op for a running one)",
            "responses": {"200": _json("Session"), **_errors(404, 410)}}},
        "/sessions/{session_id}/fork": {"parameters": [_SID], "post": {
            "summary": "new sessions with this one's memory, kernel and files at one instant, each with a fresh "
                       "identity; the parent keeps running",
            "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Fork"}}}},
            "responses": {"201": _json("Sessions", "the children"), **_errors(400, 404, 409, 410)}}},
        "/sessions/{session_id}/timeout": {"parameters": [_SID], "post": {
            "summary": "close the session this many seconds from now (replaces its lifetime)",
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Timeout"}}}},
            "responses": {"200": _json("Session"), **_errors(400, 404, 410)}}},
        "/sessions/{session_id}/files": {"parameters": [_SID, _PATH], "get": {
            "summary": "list a directory", "responses": {"200": {"description": "entries"}, **_errors(400, 404, 410, 413)}}},
        "/sessions/{session_id}/files/content": {
            "parameters": [_SID, {**_PATH, "required": True}],
            "get": {"summary": "download a file", "responses": {"200": {"description": "raw bytes",
                    "content": {"application/octet-stream": {}}}, **_errors(400, 404, 410, 413)}},
            "put": {"summary": "upload a file (raw body)", "requestBody": {"content": {"application/octet-stream": {}}},
                    "responses": {"201": {"description": "written"}, **_errors(400, 404, 410, 413)}}},
        **_CONTEXT_PATHS,
    },
}


# ---- results' data and chart; commands, more file operations, metrics (server/surface.py) ----

OPENAPI["components"]["schemas"]["Result"]["properties"].update({
    "data": {"type": "object", "description": "a DataFrame result's columns {name: [values]} (E2B's `data`)"},
    "chart": {"$ref": "#/components/schemas/Chart"}})
OPENAPI["components"]["schemas"].update({
    "Chart": {"type": "object", "required": ["type", "elements"], "description": (
        "a matplotlib figure's chart (E2B's shapes; docs/architecture.md): line and scatter {label, points: [[x, y]]}, "
        "bar {label, group, value}, pie {label, angle, radius}, box_and_whisker {label, min, first_quartile, median, "
        "third_quartile, max, outliers}, superchart (one chart per axes), unknown (no elements)"),
        "properties": {"type": {"type": "string", "enum": ["line", "scatter", "bar", "pie", "box_and_whisker",
                                                           "superchart", "unknown"]},
                       "title": {"type": "string", "nullable": True}, "elements": {"type": "array", "items": {}},
                       **{k: {"type": "string", "nullable": True} for k in ("x_label", "y_label", "x_unit", "y_unit",
                                                                             "x_scale", "y_scale")},
                       **{k: {"type": "array", "items": {}} for k in ("x_ticks", "x_tick_labels", "y_ticks",
                                                                        "y_tick_labels")}}},
    "Command": {"type": "object", "required": ["cmd"], "properties": {
        "cmd": {"type": "string", "description": "run by /bin/bash -c in the guest, in its own cgroup"},
        "envs": {"type": "object", "additionalProperties": {"type": "string"}},
        "cwd": {"type": "string", "description": "relative to the guest home (default: the home)"},
        "timeout": {"type": "number", "minimum": 0, "description": "seconds until it is killed (0 or absent: none)"}}},
    "CommandEnd": {"type": "object", "properties": {
        "id": {"type": "string"}, "pid": {"type": "integer"}, "exit_code": {"type": "integer"},
        "error": {"type": "string", "nullable": True}, "timed_out": {"type": "boolean"},
        "truncated": {"type": "array", "items": {"type": "string"}, "description": "streams cut at 16 MiB"},
        "stdout": {"type": "string"}, "stderr": {"type": "string"}}},
    "PathBody": {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}},
    "Metrics": {"type": "object", "properties": {
        "cpu_count": {"type": "integer"}, "cpu_used_pct": {"type": "number"},
        **{k: {"type": "integer", "description": "bytes"} for k in ("mem_used", "mem_total", "disk_used", "disk_total")},
        "timestamp": {"type": "number", "description": "the guest's clock, seconds since the epoch"}}},
})
_CID = {"name": "command_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _body(ref: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


OPENAPI["paths"].update({
    "/sessions/{session_id}/commands": {"parameters": [_SID], "post": {
        "summary": "run a shell command; `Accept: application/x-ndjson` streams lines start {id, pid}, stdout/stderr "
                   "{data}, keepalive, end {exit_code, error, timed_out, truncated}; a client that leaves kills it",
        "requestBody": _body("Command"),
        "responses": {"200": {"description": "its end with all its output, or NDJSON lines", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/CommandEnd"}},
            "application/x-ndjson": {"schema": {"type": "string"}}}}, **_errors(400, 404, 410, 413)}}},
    "/sessions/{session_id}/commands/{command_id}/kill": {"parameters": [_SID, _CID], "post": {
        "summary": "SIGKILL a running command and everything it started",
        "responses": {"200": {"description": "{killed}: false if it was not running"}, **_errors(404, 410)}}},
    "/sessions/{session_id}/files/exists": {"parameters": [_SID, {**_PATH, "required": True}], "get": {
        "summary": "whether a path exists", "responses": {"200": {"description": "{path, exists}"},
                                                          **_errors(400, 404, 410)}}},
    "/sessions/{session_id}/files/remove": {"parameters": [_SID], "post": {
        "summary": "remove a file, or a directory with its contents", "requestBody": _body("PathBody"),
        "responses": {"204": {"description": "removed"}, **_errors(400, 403, 404, 410)}}},
    "/sessions/{session_id}/files/dir": {"parameters": [_SID], "post": {
        "summary": "make a directory (and its parents)", "requestBody": _body("PathBody"),
        "responses": {"201": {"description": "{path, created: true}"}, "200": {"description": "{path, created: false}: "
                      "it existed"}, **_errors(400, 403, 410)}}},
    "/sessions/{session_id}/files/rename": {"parameters": [_SID], "post": {
        "summary": "move a file or directory", "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "required": ["path", "new_path"], "properties": {
                "path": {"type": "string"}, "new_path": {"type": "string"}}}}}},
        "responses": {"200": {"description": "the moved entry {name, path, type, size}"}, **_errors(400, 403, 404, 410)}}},
    "/sessions/{session_id}/files/watch": {"parameters": [_SID], "post": {
        "summary": "watch a directory: NDJSON lines start {id, path}, event {name, event_type: create|write|remove|"
                   "rename|chmod|overflow}, keepalive; until stopped or the client leaves",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["path"], "properties": {
                "path": {"type": "string"}, "recursive": {"type": "boolean", "default": False}}}}}},
        "responses": {"200": {"description": "NDJSON lines", "content": {"application/x-ndjson": {
            "schema": {"type": "string"}}}}, **_errors(400, 404, 410, 413)}}},
    "/sessions/{session_id}/files/watch/{watch_id}/stop": {"parameters": [_SID, {**_CID, "name": "watch_id"}], "post": {
        "summary": "end a watch (its stream ends)", "responses": {"200": {"description": "{stopped}"},
                                                                  **_errors(404, 410)}}},
    "/sessions/{session_id}/metrics": {"parameters": [_SID], "get": {
        "summary": "the VM's CPU, memory and disk use (E2B's SandboxMetrics)",
        "responses": {"200": _json("Metrics"), **_errors(404, 410)}}},
})
