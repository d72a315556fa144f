"""What a task kind is: one object that owns everything moeguard does differently per kind.

A kind says which record fields a task needs, how a source row becomes a record, how a model
is scored on the records (metrics and a trivial baseline), how a record becomes a training
example, what an active learner may see of a record and how unsure the model is about it.
Code elsewhere asks ``task.kind_spec`` instead of switching on the kind's name.

Kinds register in :data:`KINDS`; the built-ins live one per file in this package and are
imported by ``registry.py`` on the first lookup. Nothing here imports torch: task definitions
are read by commands (``moeguard tasks list``) that should not pay for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moeguard.registry import Registry

if TYPE_CHECKING:
    import torch

    from moeguard.realign.strategies.base import Query
    from moeguard.tasks.base import Task

IGNORE = -100  # label of a token that is context, not target


@dataclass(frozen=True)
class Example:
    """One supervised token sequence: ``labels`` is ``IGNORE`` where the token is context."""

    ids: list[int]
    labels: list[int]


Evaluation = tuple[dict[str, float], "int | None", "dict[str, Any] | None"]


class TaskKindSpec(ABC):
    """A task kind. Subclass it, set the class attributes, implement the abstract methods, and
    register one instance with :func:`register_kind` (see docs/tasks.md, "Adding a task kind").

    Class attributes:

    - ``name``: the value of ``kind:`` in task files.
    - ``required_fields``: normalized field names a task of this kind must map under ``fields:``.
    - ``metrics``: every metric :meth:`evaluate` reports; ``primary_metric``: the default score;
      ``lower_is_better``: those of them where less is better (loss, perplexity, an error rate):
      retention, the risk levels and the attacker's envelopes read the direction from here.
    - ``baseline``: the name of the trivial baseline :meth:`evaluate` reports next to the model.
    - ``takes_reference``: whether a reference perplexity (``normalized_perplexity``) applies.
    - ``prompted``: whether the task's ``prompt:`` renders the ``input`` field.
    - ``reads_raw_input``: whether records also need the unprompted ``input`` column.
    - ``record_needs``: what a row must hold to become a record (the empty-split error names it).
    - ``unlabeled_fields``: the record fields an active learner sees before paying for a label.
    - ``generates``: whether the model's uncertainty about a record is read from its own greedy
      generation (the default reads the record's input tokens).
    - ``running_text``: whether records are pieces of running text (a txt file is cut into them).
    """

    name: str = ""
    description: str = ""
    required_fields: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    primary_metric: str = ""
    lower_is_better: tuple[str, ...] = ()
    baseline: str = ""
    takes_reference: bool = False
    prompted: bool = True
    reads_raw_input: bool = False
    record_needs: str = "text or target"
    unlabeled_fields: tuple[str, ...] = ("input",)
    generates: bool = False
    running_text: bool = False

    # ------------------------------------------------------------------ definition

    def validate(self, task: Task) -> None:
        """Kind-specific checks of a task definition (after the required fields); raise
        :class:`~moeguard.errors.MoeguardError` on a problem."""

    @abstractmethod
    def record(self, task: Task, row: dict[str, Any], split: str, where: str) -> dict[str, Any] | None:
        """The normalized record of one source ``row`` (column -> value), or ``None`` to skip the
        row. ``split`` and ``where`` (the file or dataset) are for error messages."""

    # ------------------------------------------------------------------ evaluation

    @abstractmethod
    def evaluate(self, model: Any, tokenizer: Any, task: Task, records: list[dict[str, Any]],
                 train: list[dict[str, Any]] | None, batch_size: int, reference: float | None,
                 ticker: Any) -> Evaluation:
        """Score ``model`` on the eval ``records`` (called under ``torch.no_grad()`` in eval mode).

        Returns ``(metrics, n_tokens, baseline)``: every metric of :attr:`metrics`, the number of
        predicted tokens (or ``None``), and the baseline fit on the ``train`` records as
        ``{"name", "description", "metrics"}`` (``None`` when ``train`` is ``None``).
        ``ticker.start(total)`` is called once with the number of batches, then
        ``ticker.advance()`` after each batch."""

    # ------------------------------------------------------------------ training

    @abstractmethod
    def examples(self, tokenizer: Any, task: Task, record: dict[str, Any]) -> list[Example]:
        """The supervised sequences of one record, read the way evaluation reads it (a long
        language-modeling text gives several)."""

    @abstractmethod
    def training_text(self, task: Task, record: dict[str, Any]) -> str:
        """The plain string a model is pre-trained on for one record (``moeguard zoo train``):
        what evaluation will ask, then the answer."""

    # ------------------------------------------------------------------ active learning

    @abstractmethod
    def input_ids(self, tokenizer: Any, task: Task, record: dict[str, Any]) -> list[int]:
        """The tokens the model reads for an unlabeled record (its prompt, or its first window)."""

    def uncertainty(self, q: Query) -> torch.Tensor:
        """The kind's default uncertainty per candidate of ``q``, higher = less sure: the mean
        token NLL of the record's text (or of the model's own generation)."""
        return q.sequence_uncertainty[0]

    def entropy(self, q: Query) -> torch.Tensor:
        """Predictive entropy per candidate: the mean next-token entropy."""
        return q.sequence_uncertainty[1]

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"<task kind {self.name!r}>"

    def __reduce__(self):
        # one object per kind, also across pickling (worker processes) and deepcopy
        return (get_kind, (self.name,))


KINDS: Registry[TaskKindSpec] = Registry("task kind", loader="moeguard.tasks.kinds.registry",
                                         hint="see docs/tasks.md, 'Adding a task kind'")


def register_kind(spec: TaskKindSpec, *, overwrite: bool = False) -> TaskKindSpec:
    """Register ``spec`` under ``spec.name``; returns it (so a kind module can keep a handle)."""
    from moeguard.errors import MoeguardError

    if not isinstance(spec, TaskKindSpec) or not spec.name:
        raise MoeguardError(f"{spec!r} is not a named TaskKindSpec",
                            hint="subclass moeguard.tasks.kinds.TaskKindSpec, set name, register an instance")
    return KINDS.add(spec.name, spec, overwrite=overwrite)


def get_kind(name: str) -> TaskKindSpec:
    """The registered kind ``name``; an unknown name is an error that lists the known ones."""
    return KINDS.get(str(name))


def kind_names() -> list[str]:
    """Every registered kind's name, sorted."""
    return KINDS.names()

