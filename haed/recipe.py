"""A recipe: one TOML file with the data, the model, the training phases, generation and comparison.

Every field has a default, so a recipe only states what it changes. `--set a.b=v` overrides any field
from the command line (`main.layers=8` is short for `model.main.layers=8`). Every field is checked
against its annotation and range (`haed.config`), then the rules that tie fields together; the phase
sections and what each may hold come from the objective records (`haed.objectives`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haed.config import (
    COMPILE_MODES,
    CompareConfig,
    DataConfig,
    GenerateConfig,
    ModelConfig,
    TrainConfig,
    check_fields,
    field_types,
    recompute_stacks,
)
from haed.errors import HaedError, os_reason
from haed.objectives import IEM, OBJECTIVES, phase_sections

# The built-in recipes are package data: installed with haed, found beside this file.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    iem: TrainConfig = field(default_factory=TrainConfig)
    decoder: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, lr=1e-3, warmup_steps=10))
    full: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Recipe":
        """Check every field's type and range, then the rules that tie fields together."""
        check_fields(self)
        m = self.model
        archs = list(dict.fromkeys(o.arch for o in OBJECTIVES.values()))  # what some objective trains
        if m.arch not in archs:
            raise HaedError(f"model.arch must be {_one_of(archs)}, not {m.arch!r}")
        if m.pooling not in ("concat", "mean"):
            raise HaedError(f"model.pooling must be 'concat' or 'mean', not {m.pooling!r}")
        if m.conditioning not in ("add", "prefix"):
            raise HaedError(f"model.conditioning must be 'add' or 'prefix', not {m.conditioning!r}")
        if m.score not in ("dot", "cosine"):
            raise HaedError(f"model.score must be 'dot' or 'cosine', not {m.score!r}")
        for name in ("encoder", "main", "decoder"):
            s = getattr(m, name)
            if s.dim % s.heads or (s.dim // s.heads) % 2:
                raise HaedError(f"model.{name}.dim ({s.dim}) must split into {s.heads} heads of even width")
        self._validate_phases()
        if m.arch != "flat" and self.data.seq_len % m.patch_size:
            raise HaedError(
                f"data.seq_len ({self.data.seq_len}) must be a multiple of model.patch_size ({m.patch_size})"
            )
        return self

    def _validate_phases(self) -> None:
        """The phase sections (each objective record names its own): stacks to recompute, candidates, and
        `main_layers` only where an objective takes it, at most the main model's depth."""
        for phase in phase_sections():
            bad = set(recompute_stacks(getattr(self, phase).recompute)) - {"encoder", "main", "decoder"}
            if bad:
                raise HaedError(f"{phase}.recompute names unknown stacks {sorted(bad)}: use encoder, main, decoder")
            if getattr(self, phase).compile_mode not in COMPILE_MODES:
                raise HaedError(
                    f"{phase}.compile_mode must be one of {', '.join(COMPILE_MODES)}, "
                    f"not {getattr(self, phase).compile_mode!r}"
                )
            if getattr(self, phase).candidates not in ("global", "local"):
                raise HaedError(
                    f"{phase}.candidates must be 'global' or 'local', not {getattr(self, phase).candidates!r}"
                )
        takers = [o for o in OBJECTIVES.values() if o.takes_main_layers]
        for phase in phase_sections():
            if getattr(self, phase).main_layers and phase not in {o.section for o in takers}:
                raise HaedError(
                    f"{phase}.main_layers: only the {takers[0].name} phase takes main_layers "
                    f"({takers[0].section}.main_layers)"
                )
        children = {o.section for o in OBJECTIVES.values() if o.parent_objective}
        for phase in phase_sections():
            if getattr(self, phase).match_moments and not getattr(self, phase).carry_moments:
                raise HaedError(f"{phase}.match_moments adjusts carried moments: it needs {phase}.carry_moments")
            if getattr(self, phase).carry_moments and phase not in children:
                raise HaedError(
                    f"{phase}.carry_moments: only a phase that starts from another run's weights takes it "
                    f"({', '.join(sorted(f'{c}.carry_moments' for c in children))})"
                )
        for o in takers:
            layers = getattr(self, o.section).main_layers
            if self.model.arch == o.arch and layers > self.model.main.layers:
                raise HaedError(
                    f"{o.section}.main_layers ({layers}) must be at most main.layers ({self.model.main.layers})"
                )


def _one_of(values: list[str]) -> str:
    """'a', 'b' or 'c'."""
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


def debug_recipe(dataset: str = "", patch_size: int = 4, arch: str = "haed") -> Recipe:
    """A tiny configuration for tests and smoke runs: seconds on a CPU."""
    train = dict(
        steps=4, batch_size=2, lr=3e-3, warmup_steps=1, eval_every=2, eval_batches=1, ckpt_every=2, log_every=1
    )
    phases = {section: dict(train) for section in phase_sections()}
    phases[IEM.section]["logits_chunk"] = 7  # IEM's softmax in several chunks
    return recipe_from_dict(
        {
            "name": "debug",
            "data": {"dataset": dataset, "seq_len": 16 * patch_size},
            "model": {
                "arch": arch,
                "patch_size": patch_size,
                "encoder": {"dim": 16, "layers": 1, "heads": 2},
                "main": {"dim": 32, "layers": 2, "heads": 2},
                "decoder": {"dim": 16, "layers": 2, "heads": 2},
            },
            **phases,
            "generate": {"max_bytes": 20},
        }
    )


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise HaedError(f"recipe section [{where}] must be a table, not {values!r}")
    kinds = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in kinds:
            raise HaedError(f"unknown recipe field {where + '.' if where else ''}{key} ({_suggest(cls, key)})")
        sub = kinds[key] if dataclasses.is_dataclass(kinds[key]) else None
        kwargs[key] = _build(sub, value, f"{where}.{key}".strip(".")) if sub else value
    return cls(**kwargs)


def _field_paths(cls, prefix: str = ""):
    for name, kind in field_types(cls).items():
        yield f"{prefix}{name}", name
        if dataclasses.is_dataclass(kind):
            yield from _field_paths(kind, f"{prefix}{name}.")


def _suggest(cls, key: str) -> str:
    deeper = [path for path, name in _field_paths(cls) if name == key and "." in path]
    if deeper:
        return "did you mean " + " or ".join(deeper) + "?"
    return "known: " + ", ".join(field_types(cls))


def recipe_from_dict(values: dict) -> Recipe:
    values = _upgrade(json.loads(json.dumps(values)))
    # The decoder phase's defaults differ from TrainConfig's: start from them, then apply the recipe.
    base = Recipe()
    merged = dataclasses.asdict(base)
    _deep_update(merged, values)
    return _build(Recipe, merged, "").validate()


def _upgrade(values: dict) -> dict:
    """Recipes (and run configs) written before a field was renamed: a stack's `checkpoint` is now `recompute`."""
    for stack in (values.get("model") or {}).values():
        if isinstance(stack, dict) and "checkpoint" in stack:
            stack.setdefault("recompute", stack.pop("checkpoint"))
    return values


def _deep_update(target: dict, values: dict, where: str = "") -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value, f"{where}{key}.")
        else:
            target[key] = value


def resolve_recipe_path(name_or_path: str) -> Path:
    """A .toml path as given, or the name of a built-in recipe (`tiny`, `enwik8`, `speech`)."""
    path = Path(name_or_path)
    builtin = RECIPES_DIR / f"{name_or_path}.toml"
    if path.is_file() or (path.is_dir() and not builtin.is_file()):  # a folder: refused when read, as a folder
        return path
    if builtin.is_file():
        return builtin
    raise HaedError(
        f"no recipe {name_or_path!r}: give a .toml path or one of: {', '.join(builtin_recipes()) or '(none found)'}"
    )


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml")) if RECIPES_DIR.is_dir() else []


def load_recipe(name_or_path: str, overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe, apply `overrides` (`key.path=value` strings, as `--set` takes them), then
    `values` ({"key.path": value}, set as given: typed options need no quoting), and check it."""
    path = resolve_recipe_path(name_or_path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise HaedError(f"recipe {path} is not valid TOML: {e}") from None
    except (UnicodeDecodeError, OSError) as e:
        why = "it is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else os_reason(e)
        raise HaedError(f"cannot read recipe {path}: {why}") from None
    table.setdefault("name", path.stem)
    apply_overrides(table, overrides or [])
    apply_values(table, values or {})
    return recipe_from_dict(table)


_SECTIONS = {f.name for f in dataclasses.fields(Recipe)}
_MODEL_SHORTHAND = {f.name for f in dataclasses.fields(ModelConfig)} - _SECTIONS  # not `decoder`: a section too


def _key_parts(key: str) -> list[str]:
    parts = key.strip().split(".")
    if parts[0] not in _SECTIONS and parts[0] in _MODEL_SHORTHAND:
        parts = ["model", *parts]
    return parts


def _declared_type(parts: list[str]):
    """The annotation of the recipe field at `parts`, or None where no field is there."""
    cls = Recipe
    for i, part in enumerate(parts):
        kind = field_types(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if kind is None or i == len(parts) - 1:
            return kind
        cls = kind
    return None


def _parse_value(text: str, kind=None) -> Any:
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string
    # A string field takes the text as written: `data.dataset=2024` is the folder "2024".
    return text if kind is str and not isinstance(value, str) else value


def _set(table: dict, key: str, parts: list[str], value: Any) -> None:
    node = table
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise HaedError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def apply_overrides(table: dict, overrides: list[str]) -> None:
    """Apply `key.path=value` overrides (values parsed as TOML, bare words as strings) in place."""
    for item in overrides:
        if "=" not in item:
            raise HaedError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = _key_parts(key)
        _set(table, key, parts, _parse_value(text.strip(), _declared_type(parts)))


def apply_values(table: dict, values: dict[str, Any]) -> None:
    """Set {"key.path": value} in place, each value as given (no parsing)."""
    for key, value in values.items():
        _set(table, key, _key_parts(key), value)
