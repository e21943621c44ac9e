"""``ModelRow``: one ``models`` row (which open_clip model made which vector table), typed.

Read by attribute (``model.vector_table``); it is also a read-only mapping (``model["dim"]``,
``dict(model)``, templates), because a collection file may carry columns a later version added
(kept in ``extra``) and rows edited by hand: values are kept as the file holds them, never refused
here (the search says what is wrong when it uses one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping


@dataclasses.dataclass(frozen=True)
class ModelRow(Mapping):
    id: int | None
    name: str
    architecture: str | None
    pretrained: str | None
    checkpoint_path: str | None
    checkpoint_sha256: str | None
    dim: int
    image_size: int | None
    vector_table: str
    open_clip_version: str | None
    torch_version: str | None
    sqlite_vec_version: str | None
    precision: str | None
    created_at: str | None
    is_default: int
    extra: tuple = ()  # (column, value) of columns this version does not know

    @classmethod
    def from_row(cls, row) -> "ModelRow":
        values = dict(row)
        known = {name: values.pop(name, None) for name in MODEL_COLUMNS}
        return cls(**known, extra=tuple(values.items()))

    def __getitem__(self, key: str):
        if key in MODEL_COLUMNS:
            return getattr(self, key)
        for name, value in self.extra:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield from MODEL_COLUMNS
        yield from (name for name, _ in self.extra)

    def __len__(self) -> int:
        return len(MODEL_COLUMNS) + len(self.extra)


MODEL_COLUMNS = tuple(field.name for field in dataclasses.fields(ModelRow) if field.name != "extra")
