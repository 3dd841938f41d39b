"""A node owns its data and its code: what a SuperNode reads and imports comes from its own config.

The run config the server sends carries hyperparameters; it may name files
(`tasks.files`, `tasks.sources`) and reward code (`tasks.rewards[].name =
"module:function"`), but a node reads and imports those only when its own
`--node-config` allows it. The node's own spec:

- `data-path = "/data/owner.jsonl"`: one private JSONL file (prompt / answer);
- `data-config = "/data/owner.toml"`: a local TOML file with the node's
  `[[files]]`, `[[sources]]` and `[[rewards]]` tables (the keys of the config's
  `[tasks]` lists; relative paths are relative to that file);
- `allow-server-data = true`: read the files the run config names;
- `allow-server-code = true`: import the `module:function` rewards it names.

`fgrpo run` (one process that is the server and every node) passes both
`allow-*` keys: there the config is the user's own.

Errors that leave the node carry no data values: `public_message` keeps the
file, line and key of a data error and the kind of problem, never a cell.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationError

from fgrpo.config import FileConfig, RewardConfig, Section, SourceConfig, TasksConfig, format_validation_error
from fgrpo.errors import ConfigError, DataError, FgrpoError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATA_PATH = "data-path"
DATA_CONFIG = "data-config"
ALLOW_SERVER_DATA = "allow-server-data"
ALLOW_SERVER_CODE = "allow-server-code"


class NodeDataConfig(Section):
    """The tables of a node's `data-config` file."""

    files: list[FileConfig] = Field(default_factory=list, description="This node's JSONL files.")
    sources: list[SourceConfig] = Field(default_factory=list, description="This node's dataset files.")
    rewards: list[RewardConfig] = Field(
        default_factory=list, description="This node's reward functions (empty: the run config's built-in ones)."
    )


@dataclass(frozen=True)
class NodeSpec:
    """What one node decided about its own data and code."""

    data_path: str = ""
    data: NodeDataConfig | None = None
    allow_server_data: bool = False
    allow_server_code: bool = False

    @property
    def owns_data(self) -> bool:
        """The node brings its own examples (the run's files, sources and families are not its pool)."""
        return bool(self.data_path) or bool(self.data and (self.data.files or self.data.sources))


def _flag(node_config: Mapping, key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"node config {key} = {value!r} must be true or false")
    return value


def _resolve(path: str, folder: Path) -> str:
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else folder / candidate)


def load_node_data_config(path: str | Path) -> NodeDataConfig:
    """Read a node's data-config TOML; relative paths are taken relative to its folder."""
    path = Path(path).expanduser()
    where = f"node config {DATA_CONFIG} '{path}'"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file on this node")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where}: not valid UTF-8 TOML ({type(exc).__name__})") from None
    allowed = sorted(NodeDataConfig.model_fields)
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" — did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{where}: unknown key '{key}'{suggestion} (allowed: {', '.join(allowed)})")
    try:
        spec = NodeDataConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where).replace("\n", "; ")) from None
    folder = path.resolve().parent
    return spec.model_copy(
        update={
            "files": [f.model_copy(update={"path": _resolve(f.path, folder)}) for f in spec.files],
            "sources": [s.model_copy(update={"path": _resolve(s.path, folder)}) for s in spec.sources],
        }
    )


def node_spec(node_config: Mapping) -> NodeSpec:
    """This node's own spec from its `--node-config` (and the data-config file it names)."""
    data_config = str(node_config.get(DATA_CONFIG, "") or "")
    return NodeSpec(
        data_path=str(node_config.get(DATA_PATH, "") or ""),
        data=load_node_data_config(data_config) if data_config else None,
        allow_server_data=_flag(node_config, ALLOW_SERVER_DATA),
        allow_server_code=_flag(node_config, ALLOW_SERVER_CODE),
    )


def server_paths(tasks: TasksConfig) -> list[str]:
    """The keys of the run config that name a file."""
    return [f"tasks.files[{i}].path" for i in range(len(tasks.files))] + [
        f"tasks.sources[{i}].path" for i in range(len(tasks.sources))
    ]


def server_code(tasks: TasksConfig) -> list[str]:
    """The keys of the run config that name code to import ('module:function' rewards)."""
    return [f"tasks.rewards[{i}].name" for i, reward in enumerate(tasks.rewards) if ":" in reward.name]


def node_tasks(tasks: TasksConfig, spec: NodeSpec) -> TasksConfig:
    """The [tasks] this node uses: the run's settings, with the node's own data and reward code.

    A node with its own data never reads the run's files (nor trains on its
    families: see `federation.clientapp._client_data`). Without its own
    data, files named by the run config are read only with allow-server-data;
    'module:function' rewards of the run config are imported only with
    allow-server-code (or replaced by the node's own `[[rewards]]`).
    """
    update: dict = {}
    if spec.owns_data:
        own = spec.data or NodeDataConfig()
        update.update(files=own.files, sources=own.sources)  # families stay: the tiny model's warm start uses them
    elif server_paths(tasks) and not spec.allow_server_data:
        raise ConfigError(
            f"this node does not read files the server names ({', '.join(server_paths(tasks)[:3])}): give the node "
            f"its own data with --node-config '{DATA_CONFIG}=/path/owner.toml' (or '{DATA_PATH}=/path/data.jsonl'), "
            f"or let the server choose with '{ALLOW_SERVER_DATA}=true'"
        )
    if spec.data is not None and spec.data.rewards:
        update["rewards"] = spec.data.rewards
    elif server_code(tasks) and not spec.allow_server_code:
        raise ConfigError(
            f"this node does not import code the server names ({', '.join(server_code(tasks)[:3])}): list the node's "
            f"own [[rewards]] in its {DATA_CONFIG} file, or let the server choose with '{ALLOW_SERVER_CODE}=true'"
        )
    return tasks.model_copy(update=update) if update else tasks


def public_message(error: BaseException) -> str:
    """What may leave the node about an error while reading its data: where and what kind, never a value.

    A DataError carries its value-free form in `public`; fgrpo's other errors
    name keys and files only; anything else (an OSError, a parser's own error,
    which may quote the file) is reduced to its type.
    """
    if isinstance(error, DataError):
        return getattr(error, "public", None) or "a data file of this node is malformed"
    if isinstance(error, FgrpoError):
        return str(error)
    if isinstance(error, OSError):
        return f"{type(error).__name__} ({error.strerror or 'no detail'}) while reading this node's data"
    return f"{type(error).__name__} while reading this node's data (details stay on the node)"
