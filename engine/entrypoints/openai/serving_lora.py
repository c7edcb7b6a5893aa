"""LoRA adapters on the server: --lora-modules at start-up, /v1/load_lora_adapter and
/v1/unload_lora_adapter at run time (vLLM's request shapes), and their /v1/models cards.
A request selects an adapter by giving its name as "model"."""
from __future__ import annotations

import json

from fastapi.responses import PlainTextResponse

from octavo.lora.request import LoRARequest

from .protocol import ModelCard, OpenAIModel
from .serving_engine import APIError, ServerContext


class LoadLoRAAdapterRequest(OpenAIModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(OpenAIModel):
    lora_name: str
    lora_int_id: int | None = None


def parse_lora_modules(items: list[str] | None) -> list[tuple[str, str, str | None]]:
    """--lora-modules values -> (name, path, base model name or None)."""
    modules = []
    for item in items or []:
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
                modules.append((spec["name"], spec["path"], spec.get("base_model_name")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {item!r}: a JSON module needs \"name\" and "
                                 f"\"path\" ({e})") from None
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {item!r}: give name=path (or JSON with name and "
                             "path)")
        modules.append((name, path, None))
    names = [m[0] for m in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"--lora-modules names must be unique, got {names}")
    return modules


class OpenAIServingLoRA:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self._next_id = max((r.lora_int_id for r in ctx.lora_requests.values()), default=0) + 1

    @staticmethod
    def load_startup_modules(llm_engine, items: list[str] | None, served: list[str]
                             ) -> dict[str, LoRARequest]:
        """Load --lora-modules into the engine before it serves (a bad adapter stops the
        server from starting, saying which)."""
        modules = parse_lora_modules(items)
        if modules and not llm_engine.config.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        loaded = {}
        for i, (name, path, base) in enumerate(modules):
            if name in served:
                raise ValueError(f"--lora-modules name {name!r} is also the base model's name: "
                                 "pick another")
            req = LoRARequest(name, i + 1, path, base_model_name=base)
            llm_engine.add_lora(req)
            loaded[name] = req
        return loaded

    def model_cards(self) -> list[ModelCard]:
        ctx = self.ctx
        return [ModelCard(id=name, root=req.lora_path,
                          parent=req.base_model_name or ctx.model_name,
                          max_model_len=ctx.max_model_len)
                for name, req in ctx.lora_requests.items()]

    def _check_enabled(self) -> None:
        if not self.ctx.engine.engine.config.enable_lora:
            raise APIError("this server was started without LoRA support: start it with "
                           "--enable-lora to load adapters", 400)

    async def load(self, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        self._check_enabled()
        ctx = self.ctx
        if not body.lora_name or not body.lora_path:
            raise APIError("Both 'lora_name' and 'lora_path' must be provided.", 400)
        if body.lora_name in ctx.lora_requests or body.lora_name in ctx.served_model_names:
            raise APIError(f"The lora adapter '{body.lora_name}' has already been loaded.", 400,
                           "lora_name")
        req = LoRARequest(body.lora_name, self._next_id, body.lora_path)
        try:
            await ctx.engine.call(lambda engine: engine.add_lora(req))
        except ValueError as e:
            raise APIError(str(e), 400, "lora_path") from e
        self._next_id += 1
        ctx.lora_requests[body.lora_name] = req
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload(self, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        self._check_enabled()
        ctx = self.ctx
        req = ctx.lora_requests.get(body.lora_name)
        if req is None:
            raise APIError(f"The lora adapter '{body.lora_name}' cannot be found.", 404,
                           "lora_name")
        del ctx.lora_requests[body.lora_name]
        await ctx.engine.call(lambda engine: engine.remove_lora(req.lora_int_id))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                 "successfully.")
