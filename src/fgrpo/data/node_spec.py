"""A node owns its data and its code: what a SuperNode reads and imports comes from its own config.

The run config the server sends carries hyperparameters; it may name files
(`tasks.files`, `tasks.sources`) and reward code (`tasks.rewards[].name =
"module:function"`), but a node reads and imports those only when its own
`--node-config` allows it. The node's own spec:

- `data-path = "/data/owner.jsonl"`: one private JSONL file (prompt / answer);
- `data-config = "/data/owner.toml"`: a local TOML file with the node's
  owner spec: `[[families]]`, `[[files]]`, `[[sources]]`, `[[rewards]]`,
  `reward_scale`, `size` (the keys of a `[[federation.clients]]` entry,
  `fgrpo.config.OwnerConfig`; relative paths are relative to that file);
- `model-source = "/models/smollm2"`, `chat-template = "/models/chat.jinja"`:
  the node's own copy of the model and its own chat template, used instead of
  the run's `model.source` / `model.chat_template`;
- `allow-server-data = true`: read the files the run config names (data files,
  and a `model.source` or `model.chat_template` that is a path on the node);
- `allow-server-code = true`: import the `module:function` rewards it names.

`fgrpo run` (one process that is the server and every node) passes both
`allow-*` keys: there the config is the user's own. When the run config lists
owners (`[[federation.clients]]`), node `partition-id = k` takes entry k and
only entry k: its data (read only with allow-server-data when it names files)
and its rewards (imported only with allow-server-code when they name code).

A run's `model.source` may name a model (`tiny`, a registry name, a hub id)
or a path on the node; `model.chat_template` may be `auto`, `none` or a path.
A path is read only with allow-server-data, and every way a server-named path
can fail (refused, missing, unreadable, not a model) gives one message, so
the server cannot learn which paths exist on the node.

Errors that leave the node carry no private values: `public_message` keeps
the file, line and key of an error and the kind of problem, never a data
cell, a completion, a reward function's own exception text or a value of the
node's config.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationError

from fgrpo.config import MAX_SEED, ModelConfig, OwnerConfig, TasksConfig, format_validation_error
from fgrpo.errors import ConfigError, DataError, FgrpoError, ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATA_PATH = "data-path"
DATA_CONFIG = "data-config"
ALLOW_SERVER_DATA = "allow-server-data"
ALLOW_SERVER_CODE = "allow-server-code"
MODEL_SOURCE = "model-source"
CHAT_TEMPLATE = "chat-template"

# The model.chat_template values that name no file.
NAMED_TEMPLATES = ("auto", "none")


# A node's data-config file holds one owner spec: the keys of a [[federation.clients]] entry.
NodeDataConfig = OwnerConfig


@dataclass(frozen=True)
class NodeSpec:
    """What one node decided about its own data and code."""

    data_path: str = ""
    data: NodeDataConfig | None = None
    allow_server_data: bool = False
    allow_server_code: bool = False
    model_source: str = ""
    chat_template: str = ""

    @property
    def owns_data(self) -> bool:
        """The node brings its own examples (the run's files, sources and families are not its pool)."""
        return bool(self.data_path) or bool(self.data and self.data.has_data())


def _flag(node_config: Mapping, key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(
            f"node config {key} = {value!r} must be true or false",
            public=f"node config {key} must be true or false (its value stays on the node)",
        )
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
        raise ConfigError(
            format_validation_error(exc, where).replace("\n", "; "),
            public=format_validation_error(exc, where, quote_values=False).replace("\n", "; "),
        ) from None
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
        model_source=str(node_config.get(MODEL_SOURCE, "") or ""),
        chat_template=str(node_config.get(CHAT_TEMPLATE, "") or ""),
    )


def names_a_path(source: str) -> bool:
    """Whether loading `model.source` would read this node's disk (a folder or file), rather than build the tiny
    model, look up a named model or fetch a hub id ('org/name').

    Anything that exists under that name on the node counts, as the loader
    would open it; so does anything spelled as a path, whether it exists or not.
    """
    if source == "tiny":
        return False
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or source.endswith(".gguf"):
        return True
    try:
        return Path(source).expanduser().exists()
    except (OSError, ValueError):  # a name the filesystem rejects (a NUL byte, too long)
        return True


def unusable_source(source: str) -> str:
    """The one message for every way a server-named model.source can fail on a node: nothing in it says why.
    Short enough that the server's failure records keep it whole."""
    return (
        f"model.source = '{source}' cannot be used on this node: it loads 'tiny', a named model, a hub id it can "
        f"fetch, its own --node-config '{MODEL_SOURCE}=…', or a path the run names only with "
        f"'{ALLOW_SERVER_DATA}=true' (details in the node's log)"
    )


def unusable_template(template: str) -> str:
    """The one message for every way a server-named model.chat_template can fail on a node."""
    return (
        f"model.chat_template = '{template}' cannot be used on this node: it reads its own --node-config "
        f"'{CHAT_TEMPLATE}=…', or a file the run names only with '{ALLOW_SERVER_DATA}=true', and only readable "
        "UTF-8 text (details in the node's log)"
    )


def _readable_text(path: str) -> bool:
    """A regular file of UTF-8 text (a FIFO or a device such as /dev/zero would never finish reading)."""
    try:
        file = Path(path).expanduser()
        if not file.is_file():
            return False
        file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


def node_model(model: ModelConfig, spec: NodeSpec) -> ModelConfig:
    """The [model] this node loads: its own model-source / chat-template, else the run's, whose paths it reads
    only with allow-server-data.

    A server-named path that is refused, missing, unreadable or not UTF-8 text
    gives one message (`unusable_source`, `unusable_template`), so a refusal
    tells the server nothing about the node's files. A node's own setting is
    its own: an error about it does not quote it.
    """
    update: dict[str, str] = {}
    if spec.model_source:
        update["source"] = spec.model_source
    elif names_a_path(model.source) and not spec.allow_server_data:
        # A ModelError, as when the loader fails: a refused path and a missing hub id look the same.
        raise ModelError(unusable_source(model.source), public=unusable_source(model.source))
    if spec.chat_template:
        if spec.chat_template not in NAMED_TEMPLATES and not _readable_text(spec.chat_template):
            raise ConfigError(
                f"node config {CHAT_TEMPLATE} = '{spec.chat_template}': no readable UTF-8 template file there",
                public=f"node config {CHAT_TEMPLATE}: no readable UTF-8 template file there",
            )
        update["chat_template"] = spec.chat_template
    elif model.chat_template not in NAMED_TEMPLATES:
        if not (spec.allow_server_data and _readable_text(model.chat_template)):
            raise ConfigError(unusable_template(model.chat_template))
    return model.model_copy(update=update) if update else model


def server_paths(tasks: TasksConfig) -> list[str]:
    """The keys of the run config that name a file."""
    return [f"tasks.files[{i}].path" for i in range(len(tasks.files))] + [
        f"tasks.sources[{i}].path" for i in range(len(tasks.sources))
    ]


def server_model_paths(model: ModelConfig) -> list[str]:
    """The keys of the run config's [model] that name a path on the nodes (see `names_a_path`)."""
    named = {"model.source": names_a_path(model.source), "model.chat_template": model.chat_template not in NAMED_TEMPLATES}
    return [key for key, is_path in named.items() if is_path]


def server_code(tasks: TasksConfig) -> list[str]:
    """The keys of the run config that name code to import ('module:function' rewards)."""
    return [f"tasks.rewards[{i}].name" for i, reward in enumerate(tasks.rewards) if ":" in reward.name]


def owner_name(owner: OwnerConfig, index: int) -> str:
    """The label of owner `index` (its `owner` column): its name, else owner<index>."""
    return owner.label(index)


def owner_seed(tasks: TasksConfig, owner: OwnerConfig, index: int) -> int:
    """The seed of owner `index`'s generated families and splits: owners with the same family get different prompts."""
    return owner.seed if owner.seed is not None else (tasks.seed + 1 + index) % (MAX_SEED + 1)


def owner_tasks(tasks: TasksConfig, owner: OwnerConfig, index: int) -> TasksConfig:
    """The [tasks] one owner's spec makes: its families, files and sources (on its reward scale) and its
    rewards (the run's when it lists none); prompt counts per family stay the run's."""
    def scaled(items: list) -> list:
        if owner.reward_scale is None:
            return list(items)
        return [item.model_copy(update={"reward_scale": tuple(owner.reward_scale)}) for item in items]

    return tasks.model_copy(
        update={
            "families": scaled(owner.families),
            "files": scaled(owner.files),
            "sources": scaled(owner.sources),
            "rewards": owner.rewards or tasks.rewards,
            "seed": owner_seed(tasks, owner, index),
        }
    )


def owner_paths(owner: OwnerConfig, where: str) -> list[str]:
    """The keys of an owner spec that name a file."""
    return [f"{where}.files[{i}].path" for i in range(len(owner.files))] + [
        f"{where}.sources[{i}].path" for i in range(len(owner.sources))
    ]


def owner_code(owner: OwnerConfig, where: str) -> list[str]:
    """The keys of an owner spec that name code to import ('module:function' rewards)."""
    return [f"{where}.rewards[{i}].name" for i, reward in enumerate(owner.rewards) if ":" in reward.name]


def owners_named(owners: list[OwnerConfig]) -> tuple[list[str], list[str]]:
    """(file keys, code keys) that the run's [[federation.clients]] entries name."""
    paths = [key for k, owner in enumerate(owners) for key in owner_paths(owner, f"federation.clients[{k}]")]
    code = [key for k, owner in enumerate(owners) for key in owner_code(owner, f"federation.clients[{k}]")]
    return paths, code


def run_owner(owners: list[OwnerConfig], spec: NodeSpec, partition_id: int) -> tuple[int, OwnerConfig] | None:
    """(k, entry k of [[federation.clients]]) for node `partition_id`, or None when the run lists no owners
    or the node brings its own data."""
    if not owners or spec.owns_data:
        return None
    if not 0 <= partition_id < len(owners):
        raise ConfigError(
            f"node config partition-id = {partition_id}, but federation.clients lists {len(owners)} owners "
            f"(partition-id must be in 0..{len(owners) - 1})",
            public=f"node config partition-id is not one of the {len(owners)} owners of federation.clients "
            f"(it must be in 0..{len(owners) - 1})",
        )
    return partition_id, owners[partition_id]


def node_tasks(
    tasks: TasksConfig, spec: NodeSpec, owner: tuple[int, OwnerConfig] | None = None, partition_id: int = 0
) -> TasksConfig:
    """The [tasks] this node uses: the run's settings, with the node's own data and reward code.

    A node with its own data (data-path, or a data-config with families, files
    or sources) never reads the run's files nor trains on the run's families.
    A node given `owner` (entry k of the run's [[federation.clients]], see
    `run_owner`) uses that entry's data and rewards only, never another
    owner's. Otherwise files named by the run config are read only with
    allow-server-data; 'module:function' rewards of the run config are
    imported only with allow-server-code (or replaced by the node's own
    `[[rewards]]`). A data-config's owner seed and name follow `partition_id`
    as entry `partition_id` of [[federation.clients]] would. The base model (the tiny model's warm start on the run's
    families) is the run's either way: `federation.clientapp` builds it from
    the run config.
    """
    own = spec.data
    rewards_key = "tasks.rewards"
    if own is not None and own.has_data():
        tasks = owner_tasks(tasks, own, partition_id)
    elif spec.data_path:
        tasks = tasks.model_copy(update={"families": [], "files": [], "sources": []})
    elif owner is not None:
        index, entry = owner
        named = owner_paths(entry, f"federation.clients[{index}]")
        if named and not spec.allow_server_data:
            raise ConfigError(
                f"this node does not read files the server names ({', '.join(named[:3])}): give the node its own "
                f"data with --node-config '{DATA_CONFIG}=/path/owner.toml', or let the server choose with "
                f"'{ALLOW_SERVER_DATA}=true'"
            )
        tasks = owner_tasks(tasks, entry, index)
        rewards_key = f"federation.clients[{index}].rewards" if entry.rewards else rewards_key
    elif server_paths(tasks) and not spec.allow_server_data:
        raise ConfigError(
            f"this node does not read files the server names ({', '.join(server_paths(tasks)[:3])}): give the node "
            f"its own data with --node-config '{DATA_CONFIG}=/path/owner.toml' (or '{DATA_PATH}=/path/data.jsonl'), "
            f"or let the server choose with '{ALLOW_SERVER_DATA}=true'"
        )
    if own is not None and own.rewards:
        return tasks.model_copy(update={"rewards": own.rewards})
    code = [f"{rewards_key}[{i}].name" for i, reward in enumerate(tasks.rewards) if ":" in reward.name]
    if code and not spec.allow_server_code:
        raise ConfigError(
            f"this node does not import code the server names ({', '.join(code[:3])}): list the node's "
            f"own [[rewards]] in its {DATA_CONFIG} file, or let the server choose with '{ALLOW_SERVER_CODE}=true'"
        )
    return tasks


def public_message(error: BaseException) -> str:
    """What may leave the node about an error: where and what kind, never a private value.

    An fgrpo error's value-free form is its `public` text when it has one, else
    its message (which names keys and files only), except for the types that
    may quote the node's files (`may_quote_private`): those leave as their
    type. Anything else (an OSError, a parser's or a library's own error,
    which may quote a file) is reduced to its type, and every OSError to one
    text, so that a missing file and an unreadable one look the same.
    """
    if isinstance(error, FgrpoError):
        if error.public:
            return error.public
        if type(error).may_quote_private:
            return "failed on this node with a message that may quote its files, so it stays in the node's log"
        return str(error) if not isinstance(error, DataError) else "a data file of this node is malformed"
    if isinstance(error, OSError):  # one text for all: a missing file and an unreadable one look the same
        return "a file on this node could not be read or written (the details stay in the node's log)"
    return f"{type(error).__name__} on this node (the details stay in the node's log)"
