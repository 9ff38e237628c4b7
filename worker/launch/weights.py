"""Weights that are on neither the volume nor a cache: fetched before vLLM starts.

The worker's start-up plans every launch (plan.py, which never downloads: the diagnostic
shows the same plan), then fetches what is missing here, with the settings: into the hub
cache vLLM would use (HF_HOME's, or HF_HUB_CACHE, or worker-vllm's BASE_PATH one), at
MODEL_REVISION, with HF_TOKEN, offline when HF_HUB_OFFLINE says so, and the weight format
LOAD_FORMAT picks; then it plans again, and vLLM starts on the downloaded folder as on any
model found on disk (download.py does the fetching; DownloadError says what went wrong).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from worker.settings.loader import Settings

if TYPE_CHECKING:  # huggingface_hub's import is only paid for when something is missing
    from worker.launch.download import DownloadPlan, DownloadResult
    from worker.launch.plan import Launch

log = logging.getLogger("worker.download")
TRUE = {"1", "true", "yes", "on"}


def download_cache(settings: Settings, env: Mapping[str, str]) -> str:
    """The hub cache a missing model goes to: the one vLLM itself would download into."""
    given = (env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or "").strip()
    return settings.download_cache or given or f"{settings.hf_home.rstrip('/')}/hub"


def _options(settings: Settings, env: Mapping[str, str]) -> dict[str, object]:
    return {"cache_dir": download_cache(settings, env), "revision": settings.flag_value(
                "--revision"), "token": (env.get("HF_TOKEN") or "").strip() or None,
            "load_format": settings.flag_value("--load-format") or "auto",
            "endpoint": (env.get("HF_ENDPOINT") or "").strip() or None}


def offline(env: Mapping[str, str]) -> bool:
    return (env.get("HF_HUB_OFFLINE") or "").strip().lower() in TRUE


def missing(launches: Sequence[Launch]) -> list[str]:
    """The hub names of the models no folder was found for."""
    return list(dict.fromkeys(x.location.model for x in launches if not x.location.is_local))


def plan(settings: Settings, env: Mapping[str, str], repo_id: str) -> DownloadPlan:
    """What fetching `repo_id` would download (for the diagnostic), DownloadError if not."""
    from worker.launch.download import plan_download

    return plan_download(repo_id, offline=offline(env),
                         **_options(settings, env))  # type: ignore[arg-type]


def fetch(settings: Settings, env: Mapping[str, str], repo_ids: Sequence[str]
          ) -> dict[str, DownloadResult]:
    """Every model of `repo_ids` downloaded (or found whole in the cache), one after the
    other (they share the volume's bandwidth); DownloadError for the first that fails."""
    from worker.launch.download import download_model

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request otherwise
    return {repo_id: download_model(repo_id, offline=offline(env), logger=log,
                                    **_options(settings, env))  # type: ignore[arg-type]
            for repo_id in repo_ids}
