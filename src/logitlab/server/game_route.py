"""``POST /v1/game``: the summarization game (``logitlab.game``) for the playground.

Request (JSON): ``paragraph`` (text), ``prefixes`` (texts; the empty prefix is always scored as the baseline),
optionally ``search`` ("greedy" | "beam") with ``budget``, ``width``, ``top_k``, ``paragraph_k``. Response:
``logitlab.game.to_dict`` of the prefixes' scores (``results``) and, with ``search``, the search's ``search``
block; every cross-entropy in nats. The work runs on the runner thread (``Runner.call``, as the other drivers
do); the scorer reaches ``yield_point()`` after every batched forward, where the runner may run a decode step
for the other streams. The server's limits on ``budget`` and the candidate counts are smaller than the CLI's.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ..game import play, search_prefix, to_dict

MAX_PREFIXES = 16
SERVER_MAX_BUDGET = 8
SERVER_MAX_CANDIDATES = 64


class GameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    paragraph: str
    prefixes: list[str] = Field(default=[], max_length=MAX_PREFIXES)
    search: str | None = None
    budget: int = Field(default=4, ge=1, le=SERVER_MAX_BUDGET)
    width: int = Field(default=4, ge=1, le=8)
    top_k: int = Field(default=16, ge=0, le=SERVER_MAX_CANDIDATES)
    paragraph_k: int = Field(default=32, ge=0, le=SERVER_MAX_CANDIDATES)


def add_game_route(app, engine, runner, auth, read_body, check_model, json_response) -> None:
    """Register ``POST /v1/game`` on ``app`` with the server's own helpers (auth, body parsing, model check,
    JSON response), so its errors and limits are those of every other route."""
    tok = engine.tokenizer

    def run(body: GameRequest) -> dict:
        out = to_dict(tok, play(engine, body.paragraph, body.prefixes))
        if body.search is not None:
            found = search_prefix(engine, body.paragraph, budget=body.budget, search=body.search, width=body.width,
                                  top_k=body.top_k, paragraph_k=body.paragraph_k)
            out["search"] = to_dict(tok, found)["search"]
            out["forwards"] += found.forwards
        return out

    @app.post("/v1/game")
    async def game(request: Request):
        auth(request)
        body = await read_body(request, GameRequest)
        name = check_model(body.model)
        result = await asyncio.wrap_future(runner.call(lambda: run(body)))
        result["model"] = name
        return json_response(result)
