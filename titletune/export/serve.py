"""`make serve`: the tuned model's GGUF behind an OpenAI-compatible HTTP API, on this machine.

    python -m titletune.export.serve [--gguf models/gguf/titletune-f16.gguf] [--host 127.0.0.1] [--port 8000]

llama-cpp-python's server (FastAPI + uvicorn: /v1/completions, /v1/chat/completions, /v1/models)
runs the GGUF on CPU. Chat requests go through the chat template inside the file, which writes
the training prompt (titletune.export.merge), and end on the model's EOS. By default the file is
models/gguf's first type (params export.gguf, as the Modelfile's FROM), on 127.0.0.1: only this
machine can reach it unless --host says otherwise.

RequestChecks answers 400 to what that server would accept and run: a chat with no messages, and
max_tokens below 1 (it reads -1 and 0 as "until the context is full"), and to a body that is not
JSON (its error handler fails on it: 500); 413 to a body over MAX_BODY. A prompt longer than the
context gets the server's own 400. The server's sampling defaults are llama-cpp-python's (e.g.
repeat_penalty 1.1): send temperature 0 and repeat_penalty 1 for evaluate's greedy answers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from titletune.cli import UserError, run_main
from titletune.export.gguf import INSTALL, file_name
from titletune.params import load_params

MAX_BODY = 8 * 2**20  # bytes of a request body; a 1 MB prompt still reaches the server (its context check)
MAX_CTX = 4096  # tokens of context at most (a KV cache for Llama 3.1's 131,072 would take 16 GB on an 8B)
CHECKED = {"/v1/completions", "/v1/chat/completions"}


def request_problem(path: str, body: bytes) -> str | None:
    """Why a request to `path` is refused, or None (wrong types are left to the server's own
    validation: 422; malformed JSON would make its error handler fail with a 500)."""
    try:
        request = json.loads(body)
    except ValueError:
        return "the request body is not valid JSON"
    if not isinstance(request, dict):
        return "the request body must be a JSON object"
    if path == "/v1/chat/completions" and request.get("messages") in ([], None):
        return "messages: at least one message is needed"
    max_tokens = request.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens < 1:
        return f"max_tokens: {max_tokens} is not allowed (must be at least 1)"
    return None


class RequestChecks:
    """ASGI middleware: reads a completion request's body, refuses it (one JSON error, as OpenAI's
    API words them) or hands it on unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in CHECKED:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return await self.refuse(send, 413, f"request body over {MAX_BODY} bytes")
        problem = request_problem(scope["path"], body)
        if problem:
            return await self.refuse(send, 400, problem)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def refuse(send, status: int, message: str):
        payload = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                        "param": None, "code": None}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def context_length(gguf: Path) -> int:
    """The model's training context (GGUF metadata), at most MAX_CTX."""
    from llama_cpp import Llama
    meta = Llama(model_path=str(gguf), vocab_only=True, verbose=False).metadata
    trained = int(meta.get(f"{meta.get('general.architecture')}.context_length", MAX_CTX))
    return min(trained, MAX_CTX)


def create_app(gguf: Path, n_ctx: int | None = None):
    """llama-cpp-python's OpenAI-compatible app on the GGUF (chat template from the file), with RequestChecks."""
    from llama_cpp.server.app import create_app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    model = ModelSettings(model=str(gguf), model_alias="titletune", n_ctx=n_ctx or context_length(gguf),
                          n_gpu_layers=0, verbose=False)
    app = llama_app(server_settings=ServerSettings(), model_settings=[model])
    app.add_middleware(RequestChecks)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="the GGUF file (default: models/gguf's first type, params export.gguf)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    if args.gguf is None:
        types = load_params("export").gguf
        if not types:
            raise UserError("params.yaml: export.gguf is empty: no GGUF to serve (set it, then `make gguf`)")
        args.gguf = Path("models/gguf") / file_name(types[0])
    if not args.gguf.is_file():
        raise UserError(f"{args.gguf}: no such GGUF file; `{INSTALL}` writes models/gguf")
    try:
        import uvicorn
    except ImportError:
        raise UserError(f"llama-cpp-python's server is not installed: run `{INSTALL}`") from None
    app = create_app(args.gguf)
    print(f"serve: {args.gguf} on http://{args.host}:{args.port}/v1 (OpenAI API; model name titletune); Ctrl-C stops")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
