"""Variables that are probably misspelt settings: a name one or two letters away from one.

A misspelt `ENABLE_PREFIX_CACHNG` would otherwise be ignored without a word. The
platform's and the system's own variables (`PATH`, `RUNPOD_*`, `CUDA_*`, `NVIDIA_*`,
...) are not compared: they are nobody's typo.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from worker.settings.table import SETTINGS
from worker.settings.vllm_flags import ALIASES, FLAGS, RETIRED

KNOWN = frozenset({s.name for s in SETTINGS} | {f.variable for f in FLAGS.values()}
                  | set(ALIASES) | set(RETIRED))
SYSTEM_PREFIXES = ("RUNPOD_", "CUDA_", "NVIDIA_", "NV_", "NCCL_", "LC_", "XDG_", "PYTHON", "PIP_",
                   "LD_", "OMP_", "KMP_", "MKL_", "TORCH", "CONDA", "UV_", "SSH_", "GIT_")
SYSTEM = frozenset({"PATH", "HOME", "HOSTNAME", "PWD", "OLDPWD", "SHLVL", "TERM", "LANG",
                    "LANGUAGE", "USER", "SHELL", "TZ", "MAIL", "LOGNAME", "DEBIAN_FRONTEND"})


def distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance of `a` and `b`, or limit + 1 once it is certainly above it."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ca != cb)))
        if min(current) > limit:
            return limit + 1
        previous = current
    return previous[-1]


def closest(name: str, names: Iterable[str]) -> str | None:
    """The one name within reach of `name` (1 edit below 10 letters, else 2), if any."""
    limit = 1 if len(name) < 10 else 2
    near = sorted((d, n) for n in names if (d := distance(name, n, limit)) <= limit)
    return near[0][1] if near and near[0][0] > 0 else None


def near_misses(env: Mapping[str, str]) -> Iterator[str]:
    """A warning for each variable that is not a setting but looks like a misspelt one."""
    for name in sorted(env):
        if (name in KNOWN or name in SYSTEM or len(name) < 5 or not name.isupper()
                or name.startswith(SYSTEM_PREFIXES)):
            continue
        if meant := closest(name, KNOWN):
            yield f"{name} is not a setting: did you mean {meant}? It is ignored."
