"""The OpenAPI document of the REST API (served at /openapi.json)."""

from .. import __version__

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_SID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
_PATH = {"name": "path", "in": "query", "schema": {"type": "string"}, "description": "relative to the guest home"}


def _json(ref: str, description: str = "ok") -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _errors(*codes: int) -> dict:
    return {str(code): _ERROR for code in (401, *codes)}


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
                           "mark)"}}},
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
                "env": {"type": "object", "additionalProperties": {"type": "string"}}}},
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
    },
}
