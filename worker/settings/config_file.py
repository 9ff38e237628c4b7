"""A vLLM config file (`VLLM_CONFIG_FILE`, vLLM's `--config`), checked before spawn.

vLLM reads the YAML file itself; the worker reads it only to refuse, with the
key's name, what vLLM would refuse (an unknown key, a value of the wrong type or
outside the choices), and to show in the diagnostic which flags came from it.
Flags on the command line win over the file, as vLLM has it.
"""

from __future__ import annotations

import json
from pathlib import Path

from worker.settings.table import SettingsError
from worker.settings.vllm_flags import FLAGS, FlagArg, FlagError, flag_argv


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def config_flags(path: str, source: str) -> dict[str, FlagArg]:
    """The flags the file sets, each checked as its variable would be; SettingsError
    naming the file and the key otherwise."""
    import yaml  # only when there is a config file: not every start pays for the import

    where = f"{source}={path}"
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"{where} cannot be read: {exc.strerror or exc}.") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{where} is not valid YAML: {exc}.") from None
    if not isinstance(loaded, dict):
        raise SettingsError(f"{where} must be a YAML mapping of vLLM options "
                            "(max-model-len: 8192, ...).")
    found: dict[str, FlagArg] = {}
    for key, value in loaded.items():
        flag = FLAGS.get("--" + str(key).replace("_", "-"))
        if flag is None:
            raise SettingsError(f"{where} has {key!r}, which is not an option of vLLM's.")
        items = value if isinstance(value, list) and flag.several else [value]
        try:
            argv = flag_argv(flag, f"{key} in {path}", " ".join(_text(i) for i in items))
        except FlagError as exc:
            raise SettingsError(str(exc)) from None
        if argv:
            found[flag.flag] = FlagArg(flag.flag, tuple(argv), f"{path} ({key})")
    return found
