"""``Recipe``: several of the library's methods as one ordered, seeded list of steps, read from YAML.

The schema (every key checked; an unknown one is refused with the valid ones listed)::

    name: smollm2-135m-sds24-dlqat4        # the artifact (and Hub repo) name
    base_model: smollm2-135m               # anything hf_compress.assets.load_model accepts
    seed: 0
    description: optional free text for the model card
    evaluation: {perplexity_windows: 16, text: wikipedia}   # measured after the base and after every step
    steps:                                 # each step: a one-key mapping {kind: {method: ..., **fields}}
      - prune: {method: sds, sparsity: "2:4"}
      - quantize: {method: dlqat, bits: 4, group_size: 128, training: {max_steps: 40}}

Parsing checks the structure (a key given twice in the YAML file included), each step's own fields (``steps/``)
and the order of the steps, all before a model is loaded (:meth:`Recipe.check`).

Example:
    >>> recipe = Recipe.from_dict({"name": "tiny", "base_model": "tiny-llama",
    ...                            "steps": [{"prune": {"method": "magnitude", "sparsity": "2:4"}}]})
    >>> [step.kind for step in recipe.steps], recipe.evaluation.perplexity_windows
    (['prune'], 16)
    >>> Recipe.from_dict({"name": "x", "base_model": "tiny-llama", "stepz": []})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hf_compress.recipe.config.RecipeError: recipe: unknown key 'stepz' (did you mean 'steps'?); valid keys: base_model, description, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..utils import DTYPE_NAMES, atomic_file, did_you_mean, read_user_text


if TYPE_CHECKING:
    from .steps import Step


__all__ = ["EvaluationSpec", "Recipe", "RecipeError", "check_keys", "refused_as"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class RecipeError(ValueError):
    """A recipe that cannot run: a bad key, value or step order. Raised before any work."""


@contextlib.contextmanager
def refused_as(where: str) -> Iterator[None]:
    """Inside, a method's own ``TypeError`` / ``ValueError`` (its config checks) becomes one ``RecipeError`` line
    naming the step.

    Example:
        >>> with refused_as("step 1 (quantize rtn)"):
        ...     raise ValueError("bits must be 2 to 8")
        Traceback (most recent call last):
        ...
        hf_compress.recipe.config.RecipeError: step 1 (quantize rtn): bits must be 2 to 8
    """
    try:
        yield
    except RecipeError:
        raise
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{where}: {' '.join(str(error).split())}") from None


def check_keys(where: str, data: Any, valid: Mapping[str, Any] | set[str] | list[str] | tuple[str, ...],
               required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` as a dict, refusing (one line, valid keys listed) a non-mapping, unknown or missing keys.

    Example:
        >>> check_keys("evaluation", {"windows": 4}, {"perplexity_windows", "text"})
        Traceback (most recent call last):
        ...
        hf_compress.recipe.config.RecipeError: evaluation: unknown key 'windows'; valid keys: perplexity_windows, text.
        >>> check_keys("evaluation", {"txt": "news"}, {"perplexity_windows", "text"})
        Traceback (most recent call last):
        ...
        hf_compress.recipe.config.RecipeError: evaluation: unknown key 'txt' (did you mean 'text'?); valid keys: perplexity_windows, text.
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping of {', '.join(sorted(valid))}, got {type(data).__name__}.")
    unknown = sorted(str(key) for key in data if key not in valid)
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        guess = did_you_mean(unknown[0], [str(key) for key in valid])
        raise RecipeError(
            f"{where}: unknown key{plural} {', '.join(repr(k) for k in unknown)}{guess}; valid keys: "
            f"{', '.join(sorted(valid))}."
        )
    missing = [key for key in required if key not in data]
    if missing:
        raise RecipeError(f"{where}: missing {', '.join(repr(k) for k in missing)}.")
    return dict(data)


@dataclass(frozen=True)
class EvaluationSpec:
    """What is measured after the base model and after every step (the same windows every time).

    Args:
        perplexity_windows: evenly spaced windows of the text's eval split (a fixed subset).
        text: ``wikipedia`` or ``news`` (``hf_compress.evaluation.suite.PERPLEXITY_SETS``).
        window: tokens per perplexity window.
        score_last: score only the last this many tokens of each window (``None``: all); for token routing,
            which saves compute on a prompt's earlier tokens, the continuation is what counts.
        batch_size: windows per forward.
        zero_shot_tasks / zero_shot_limit: zero-shot tasks scored on the base and the final model only
            (they take minutes on a CPU); none by default.
    """

    perplexity_windows: int = 16
    text: str = "wikipedia"
    window: int = 512
    score_last: int | None = None
    batch_size: int = 4
    zero_shot_tasks: tuple[str, ...] = ()
    zero_shot_limit: int | None = None

    @classmethod
    def from_dict(cls, data: Any) -> EvaluationSpec:
        from ..evaluation.suite import PERPLEXITY_SETS
        from ..utils import check_choice, check_int, check_str_list

        names = {f.name for f in dataclasses.fields(cls)}
        values = check_keys("evaluation", data if data is not None else {}, names)
        with refused_as("evaluation"):
            # The fields EvaluationSettings names otherwise (perplexity_sets, max_windows) are checked here, so an
            # error names the recipe's key.
            if "text" in values:
                check_choice("text", values["text"], tuple(PERPLEXITY_SETS))
            if "perplexity_windows" in values:
                check_int("perplexity_windows", values["perplexity_windows"], minimum=1,
                          hint="It is how many evenly spaced windows of the text are scored (e.g. 16).")
            tasks = values.get("zero_shot_tasks")
            if isinstance(tasks, Mapping):  # a list would silently keep only the keys: per-task limits go elsewhere
                raise ValueError(f"zero_shot_tasks must be a list of task names, got the mapping {tasks!r}; for "
                                 "per-task example counts use zero_shot_limit: {task: count}.")
            if "zero_shot_tasks" in values:  # null: none
                values["zero_shot_tasks"] = () if tasks is None else tuple(check_str_list(
                    "zero_shot_tasks", tasks, hint="Pass task names such as [arc_easy, piqa]."))
        spec = cls(**values)
        spec.settings(zero_shot=True)  # the evaluation's own checks (task names included), now
        return spec

    def settings(self, zero_shot: bool = False) -> Any:
        """The ``EvaluationSettings`` of one measurement (zero-shot only where asked)."""
        from ..evaluation.suite import EvaluationSettings

        with refused_as("evaluation"):
            return EvaluationSettings(
                perplexity_sets=(self.text,), window=self.window, max_windows=self.perplexity_windows,
                score_last=self.score_last, zero_shot_tasks=self.zero_shot_tasks if zero_shot else (),
                # a per-task limit must name the tasks run, so it goes only with them
                zero_shot_limit=self.zero_shot_limit if zero_shot else None, batch_size=self.batch_size,
            )

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["zero_shot_tasks"] = list(self.zero_shot_tasks)
        return values


@dataclass
class Recipe:
    """An ordered list of compression steps applied to ``base_model`` with one seed, measured after each.

    Build it with :meth:`from_yaml` / :meth:`from_dict` (which check everything, step order included) and run
    it with :func:`hf_compress.recipe.run`.

    Example:
        >>> recipe = Recipe.from_yaml("examples/recipes/smollm2-135m-sds24-dlqat4.yaml")  # doctest: +SKIP
        >>> Recipe.from_dict(recipe.to_dict()) == recipe  # doctest: +SKIP
        True
    """

    name: str
    base_model: str
    steps: list[Step]
    seed: int = 0
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    description: str | None = None
    dtype: str = "float32"
    """What ``base_model`` is loaded in: ``float32`` (the default, and what every stored benchmark used), or
    ``bfloat16`` / ``float16`` for a model whose float32 copy would not fit."""

    KEYS = ("name", "base_model", "dtype", "seed", "evaluation", "steps", "description")

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Parse and check a recipe (structure, every step's fields, the order of the steps).

        Raises:
            RecipeError: anything wrong, in one line that says what to change.
        """
        from .steps import check_order, parse_step

        values = check_keys("recipe", data, set(cls.KEYS), required=("name", "base_model", "steps"))
        _check_name(values["name"])
        name = values["name"]
        base_model = values["base_model"]
        if not isinstance(base_model, str) or not base_model.strip():
            raise RecipeError(f"recipe: base_model must be a model name, folder or Hub id, got {base_model!r}.")
        from ..assets.resolve import check_model_name_form

        try:
            check_model_name_form(base_model)  # a typo caught by `recipe check`, not once `run` loads the model
        except ValueError as err:
            raise RecipeError(f"recipe: base_model {err}") from None
        seed = values.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise RecipeError(f"recipe: seed must be an integer in [0, 2**32), got {seed!r}.")
        dtype = values.get("dtype", "float32")
        if dtype not in DTYPE_NAMES:
            raise RecipeError(f"recipe: dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}.")
        description = values.get("description")
        if description is not None and not isinstance(description, str):
            raise RecipeError(f"recipe: description must be text, got {type(description).__name__}.")
        evaluation = EvaluationSpec.from_dict(values.get("evaluation"))
        raw_steps = values["steps"]
        if not isinstance(raw_steps, list) or not raw_steps:
            raise RecipeError("recipe: steps must be a non-empty list of one-key mappings such as {prune: {...}}.")
        steps = [parse_step(index, raw, seed) for index, raw in enumerate(raw_steps)]
        check_order(steps)
        return cls(name=name, base_model=base_model, steps=steps, seed=seed, evaluation=evaluation,
                   description=description, dtype=dtype)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        """Read and check a recipe file.

        Example:
            >>> Recipe.from_yaml("recipe.yaml").name  # doctest: +SKIP
            'smollm2-135m-sds24-dlqat4'
        """
        import yaml

        path = Path(path)
        if path.is_dir():
            inside = (path / "recipe.yaml").is_file()  # a folder a recipe run (or a Hub download) wrote
            raise IsADirectoryError(f"recipe file {path} is a folder; pass the path of a recipe YAML file"
                                    + (f" ({path / 'recipe.yaml'})." if inside else "."))
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist; pass the path of a recipe YAML file.")
        try:
            data = yaml.load(read_user_text(path, "recipe file"), Loader=_unique_keys_loader())  # noqa: S506 (SafeLoader)
        except yaml.YAMLError as error:
            raise RecipeError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
        except RecipeError as error:
            raise RecipeError(f"{path}: {error}") from None
        try:
            return cls.from_dict(data)
        except RecipeError as error:
            raise RecipeError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe in the input schema (every step with its defaults filled in)."""
        data: dict[str, Any] = {"name": self.name, "base_model": self.base_model}
        if self.dtype != "float32":  # written only when set: recipes from before the field read the same
            data["dtype"] = self.dtype
        data["seed"] = self.seed
        if self.description:
            data["description"] = self.description
        data["evaluation"] = self.evaluation.to_dict()
        data["steps"] = [{step.kind: step.to_dict()} for step in self.steps]
        return data

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save_yaml(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_yaml` atomically."""
        with atomic_file(path, encoding="utf-8") as handle:
            handle.write(self.to_yaml())
        return Path(path)

    def check(self) -> list[str]:
        """The steps as one line each (``1. prune sds``); the checks already ran when the recipe was built."""
        return [f"{index + 1}. {step.describe()}" for index, step in enumerate(self.steps)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()


def _check_name(name: Any) -> None:
    """Refuse a ``name`` the Hub would refuse as a repo name (it is the artifact's repo name when published)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    problem = None
    if not isinstance(name, str) or not _NAME.match(name):
        problem = "letters, digits, '.', '_', '-'; at most 96"
    else:
        try:
            validate_repo_id(f"namespace/{name}")
        except HFValidationError:
            problem = "no '--' or '..', no '-' or '.' at either end, not ending in '.git'"
    if problem:
        raise RecipeError(f"recipe: name must be a repo-style name the Hub accepts ({problem}), got {name!r}; "
                          "choose another name.")


def _unique_keys_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            if isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges; explicit keys may override it
                        continue
                    key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                    try:
                        seen = key in first_line
                    except TypeError:  # an unhashable key: the base class says what is wrong with it
                        continue
                    if seen:
                        raise RecipeError(f"line {line}: duplicate key {key!r} (first on line {first_line[key]}); "
                                          "YAML would silently keep only the last one: remove or rename one of them.")
                    first_line[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader
