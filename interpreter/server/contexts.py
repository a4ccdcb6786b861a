"""REST routes of code contexts (sessions/contexts.py), E2B's shapes: a context is {id, language, cwd}.

    POST   /sessions/{id}/contexts                  {language?, cwd?} -> 201 {id, language, cwd}
    GET    /sessions/{id}/contexts                  -> {contexts: [{id, language, cwd}]} (the default first)
    DELETE /sessions/{id}/contexts/{ctx}            -> 204
    POST   /sessions/{id}/contexts/{ctx}/restart    -> {id, language, cwd}
    POST   /sessions/{id}/contexts/{ctx}/interrupt  -> 204
Cells pick one with `context` or `language` on POST /sessions/{id}/execute (rest.py).
"""

from __future__ import annotations

from .base import BaseHandler, parse_typed


def parse_cell_context(body: dict) -> dict:
    """`context` and `language` of an execute request, type-checked (their meaning: contexts.py)."""
    return {"context": parse_typed(body, "context", str), "language": parse_typed(body, "language", str)}


class ContextsHandler(BaseHandler):
    def get(self, session_id: str) -> None:
        session = self.manager.get(session_id)
        session.check()
        self.write_json({"contexts": [c.public() for c in session.contexts.all()]})

    async def post(self, session_id: str) -> None:
        body = self.json_body()
        session = self.manager.get(session_id)
        context = await session.create_context(body.get("language"), body.get("cwd"))
        self.write_json(context.public(), status=201)


class ContextHandler(BaseHandler):
    def get(self, session_id: str, context_id: str) -> None:
        self.write_json(self.manager.get(session_id).contexts.get(context_id).public())

    async def delete(self, session_id: str, context_id: str) -> None:
        await self.manager.get(session_id).remove_context(context_id)
        self.set_status(204)
        self.finish()


class ContextRestartHandler(BaseHandler):
    async def post(self, session_id: str, context_id: str) -> None:
        context = await self.manager.get(session_id).restart_context(context_id)
        self.write_json(context.public())


class ContextInterruptHandler(BaseHandler):
    async def post(self, session_id: str, context_id: str) -> None:
        await self.manager.get(session_id).interrupt_context(context_id)
        self.set_status(204)
        self.finish()


_ID = r"(?P<session_id>[^/]+)"
_CTX = r"(?P<context_id>[^/]+)"
CONTEXT_ROUTES = [
    (rf"/sessions/{_ID}/contexts", ContextsHandler),
    (rf"/sessions/{_ID}/contexts/{_CTX}", ContextHandler),
    (rf"/sessions/{_ID}/contexts/{_CTX}/restart", ContextRestartHandler),
    (rf"/sessions/{_ID}/contexts/{_CTX}/interrupt", ContextInterruptHandler),
]
