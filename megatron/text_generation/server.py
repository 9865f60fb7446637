"""The REST server of tools/run_text_generation_server.py.

Global rank 0 serves `PUT /api` with Flask (werkzeug's threaded server: every request in
its own thread). A request is checked and tokenized there (api.py); a bad one is answered
HTTP 400 {"message": ...} at once and reaches no other rank. A good one takes the
generation lock, so generations run one at a time in arrival order of the lock and the
other requests wait; under the lock rank 0 broadcasts the checked request to every rank
and all ranks run the same generation (tensor parallelism needs every rank in every
forward pass). The other ranks sit in follow_requests(), waiting for the next broadcast.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict

import torch

from megatron.accelerator import get_accelerator
from megatron.text_generation.api import (
    GenerateRequest,
    RequestError,
    generate_and_post_process,
    parse_generate_request,
)

_STOP = "stop"


def _broadcast(payload: Dict[str, Any] | None) -> Dict[str, Any] | None:
    """Rank 0's payload on every rank (a no-op without other ranks)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return payload
    box = [payload]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def follow_requests(model: torch.nn.Module, tokenizer, device=None) -> None:
    """Ranks other than 0: run each request rank 0 broadcasts, until it says stop."""
    while True:
        payload = _broadcast(None)
        if payload is None or payload.get("op") == _STOP:
            return
        generate_and_post_process(model, tokenizer, GenerateRequest(**payload["request"]),
                                  device)


class TextGenerationServer:
    """Flask app of `PUT /api` on rank 0 (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int, device=None,
                 max_tokens: int | None = None) -> None:
        from flask import Flask

        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_length, self.max_tokens = max_length, max_tokens
        self.lock = threading.Lock()
        self.served = 0
        self.app = Flask("megatron_text_generation")
        self.app.add_url_rule("/api", "api", self._api, methods=["PUT"])

    def _error(self, message: str, status: int = 400):
        from flask import jsonify

        return jsonify({"message": message}), status

    def _api(self):
        from flask import jsonify, request

        body = request.get_json(force=True, silent=True)
        if body is None:
            return self._error("the request body is not valid JSON (send a JSON object "
                               "with a 'prompts' list)")
        try:
            req = parse_generate_request(body, self.tokenizer, self.max_length, self.max_tokens)
        except RequestError as e:
            return self._error(str(e))
        with self.lock:  # one generation at a time; the other requests wait here
            start = time.time()
            if self.device is not None and self.device.type != "cpu":
                get_accelerator().set_device(self.device.index)  # this thread's device
            _broadcast({"op": "generate", "request": req.to_dict()})
            try:
                response = generate_and_post_process(self.model, self.tokenizer, req,
                                                     self.device)
            except ValueError as e:  # checked above; a safety net, not the path
                return self._error(str(e))
            self.served += 1
            end = time.time()
            if not req.no_log:
                print(f" request {self.served} from {request.remote_addr}: "
                      f"{len(req.prompts)} prompts, tokens_to_generate "
                      f"{req.tokens_to_generate}, generated from {start:.3f} to {end:.3f} "
                      f"({end - start:.2f} s)", flush=True)
        return jsonify(response)

    def serve(self, host: str, port: int) -> None:
        """Serve until interrupted; prints the address (port 0: a free one) once bound.
        Then tells the other ranks to stop."""
        from werkzeug.serving import make_server

        server = make_server(host, port, self.app, threaded=True)
        print(f" text generation server at http://{host}:{server.server_port}/api",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
            try:  # other ranks interrupted too have already left
                _broadcast({"op": _STOP})
            except RuntimeError:
                pass
