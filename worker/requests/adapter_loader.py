"""On-demand LoRA adapters: the first request that names one of `LORA_DIR` loads it.

The worker, not the client, loads it: it checks the folder (lora.check_on_demand: a
plain name, `adapter_config.json`, weights, a rank that fits, the base's architecture),
picks the vLLM of the model it was trained on (else the first), and calls that vLLM's
`/v1/load_lora_adapter` on loopback, a route no job or request can reach. The adapter is
then served by that vLLM, listed by its `/v1/models`, and routed there from then on. A
name that is no folder of `LORA_DIR` gets the usual 404 listing what is served; a bad
adapter a 400 naming it and why. One load at a time per name; other work goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, replace

from worker.launch.adapters import AdapterError, check_fits, check_on_demand, in_folder, pick_base
from worker.requests.errors import ProxyError, from_upstream
from worker.requests.proxy import Proxy
from worker.settings.loader import ModelSettings, SettingsError
from worker.upstream.target import Target

log = logging.getLogger("worker.lora")


@dataclass(frozen=True)
class OnDemand:
    """What loading needs: the folder, the rank vLLM made room for, the served models and
    the layer sizes of each (for the architecture check)."""

    folder: str
    max_rank: int
    models: tuple[ModelSettings, ...]
    sizes: dict[str, dict[str, int]]


class AdapterLoader:
    def __init__(self, proxy: Proxy, on_demand: OnDemand) -> None:
        self.proxy = proxy
        self.on_demand = on_demand
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def known(self, model: object) -> bool:
        return any(target.serves(model) for target in self.proxy.targets)

    async def ensure(self, model: object) -> None:
        """Load `model` from LORA_DIR if it names an adapter there not loaded yet (a lock
        per folder, not per name asked for: clients may send any name)."""
        if not isinstance(model, str) or self.known(model) \
                or not in_folder(self.on_demand.folder, model):
            return  # not an adapter of LORA_DIR: the request gets the usual 404
        async with self._locks[model]:
            if self.known(model):
                return
            await self._load(model)

    async def _load(self, name: str) -> None:
        d = self.on_demand
        try:
            folder, config = check_on_demand(d.folder, name, d.max_rank)
            base, why = pick_base(name, None, config.get("base_model_name_or_path"), d.models)
            check_fits(folder, name, d.sizes.get(base, {}), base)
        except (AdapterError, SettingsError) as exc:
            raise ProxyError(400, f"{exc}.", "model") from None
        target = next(t for t in self.proxy.targets if t.name == base)
        if target.pooling:  # its vLLM was started without LoRA (command.lora_flags)
            raise ProxyError(400, f"LoRA adapter {name}: its base {base} generates no text, and "
                                  "adapters are served on models that do.", "model")
        response = await self.proxy.client.post(
            f"{target.base_url}/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(folder)})
        if response.status_code >= 400:
            error = from_upstream(response.status_code, response.content)
            raise ProxyError(error.status, f"LoRA adapter {name} could not be loaded: "
                                           f"{error.message}", "model")
        self._add(target, name)
        log.info("LoRA adapter %s loaded from %s into the vLLM of %s (%s)", name, folder,
                 base, why)

    def _add(self, target: Target, name: str) -> None:
        self.proxy.targets = [replace(t, adapters=t.adapters | {name}) if t is target else t
                              for t in self.proxy.targets]
