"""Text document sources through `datasets`: local json/jsonl/parquet/txt files or a Hugging Face dataset by name."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from itertools import groupby
from typing import Iterator, Optional

from megadistill.data.split import text_key
from megadistill.errors import UserError

log = logging.getLogger(__name__)

# file suffix -> datasets builder; compressed variants (.jsonl.gz, .txt.zst, ...) are read by the same builder
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


@dataclass
class Document:
    position: int  # row index in the source stream (rows with empty text are counted, not yielded)
    key: str  # stable key deciding the split: a hash of the text
    text: str
    resume: Optional[dict]  # datasets iterator state just before this row (None if unsupported)


def builder_for(path: str) -> str:
    """The `datasets` builder that reads a local file, from its suffix."""
    name = path.lower()
    for comp in _COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
    for suffix, builder in _BUILDERS.items():
        if name.endswith(suffix):
            return builder
    raise UserError(f"data file {path!r} has an unsupported suffix; use one of {sorted(_BUILDERS)} "
                    f"(optionally compressed: {list(_COMPRESSION)})")


class TextSource:
    """An ordered, restartable stream of text documents (`Document`s) from files or a hub dataset.

    Files are read in the given order (consecutive files of one format form one streamed dataset; txt
    files give one document per line). Hub datasets use load_dataset(name, config, split, streaming=...).
    Restart at a row either from a saved `datasets` iterator state (cheap: jumps to the shard and row)
    or, failing that, by skipping rows.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.kind = cfg.source
        self.text_field = cfg.text_field
        if self.kind == "files":
            if not cfg.files:
                raise UserError("data.source='files' needs data.files=[path, ...]")
            missing = [f for f in cfg.files if not os.path.isfile(f)]
            if missing:
                raise UserError(f"data.files: {missing[0]!r} does not exist (or is not a file)")
            for f in cfg.files:
                builder_for(f)
        elif self.kind == "hf":
            if not cfg.hf_name:
                raise UserError("data.source='hf' needs data.hf_name (e.g. allenai/c4)")
        else:
            raise UserError(f"TextSource reads data.source='files' or 'hf', not {self.kind!r}")
        self._ds = None
        self._fresh_state: Optional[dict] = None

    def describe(self) -> dict:
        if self.kind == "files":
            return {"source": "files", "files": list(self.cfg.files), "text_field": self.text_field}
        return {"source": "hf", "hf_name": self.cfg.hf_name, "hf_config": self.cfg.hf_config,
                "hf_split": self.cfg.hf_split, "streaming": self.cfg.streaming, "text_field": self.text_field}

    @property
    def streaming(self) -> bool:
        return self.kind == "files" or bool(self.cfg.streaming)

    def _dataset(self):
        if self._ds is not None:
            return self._ds
        import datasets

        try:
            if self.kind == "files":
                parts = []
                for builder, group in groupby(self.cfg.files, key=builder_for):
                    ds = datasets.load_dataset(builder, data_files=list(group), split="train", streaming=True)
                    parts.append(ds.select_columns([self.text_field]) if len(self.cfg.files) > 1 else ds)
                self._ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            else:
                self._ds = datasets.load_dataset(self.cfg.hf_name, self.cfg.hf_config, split=self.cfg.hf_split,
                                                 streaming=bool(self.cfg.streaming))
        except (FileNotFoundError, ValueError) as e:
            where = self.cfg.files if self.kind == "files" else self.cfg.hf_name
            raise UserError(f"could not open data source {where!r}: {e}") from None
        self._fresh_state = _state(self._ds) if self.streaming else None
        return self._ds

    def _text(self, row: dict, position: int) -> str:
        if self.text_field not in row:
            raise UserError(f"data row {position} has no field {self.text_field!r} (fields: {sorted(row)}); "
                            f"set data.text_field to the column that holds the text")
        text = row[self.text_field]
        return text if isinstance(text, str) else ("" if text is None else str(text))

    def documents(self, start: int = 0, resume: Optional[dict] = None) -> Iterator[Document]:
        """Documents from row `start` on (to the end of the source); `resume` is the Document.resume of that row."""
        ds = self._dataset()
        if not self.streaming:  # map-style: random access by row
            for lo in range(start, len(ds), 256):
                rows = ds[lo: lo + 256]
                if self.text_field not in rows:
                    raise UserError(f"dataset {self.cfg.hf_name!r} has no column {self.text_field!r} "
                                    f"(columns: {sorted(rows)}); set data.text_field")
                for i, text in enumerate(rows[self.text_field]):
                    text = text if isinstance(text, str) else ""
                    if text.strip():
                        yield Document(lo + i, text_key(text), text, None)
            return
        it, position = self._iterator(ds, start, resume)
        while True:
            state = _state(ds)
            try:
                row = next(it)
            except StopIteration:
                return
            text = self._text(row, position)
            if text.strip():
                yield Document(position, text_key(text), text, state)
            position += 1

    def _iterator(self, ds, start: int, resume: Optional[dict]):
        # load_state_dict is sticky (every later iter(ds) starts there), so always load one: the saved
        # state of row `start`, or the fresh-iterator state captured when the dataset was opened.
        if resume is not None:
            try:
                ds.load_state_dict(resume)
                return iter(ds), start
            except Exception as e:  # a state from another datasets version or file layout
                log.warning("data: could not restore the datasets iterator state (%s); skipping %d rows", e, start)
        if self._fresh_state is not None:
            ds.load_state_dict(self._fresh_state)
        it = iter(ds)
        for _ in range(start):  # row by row (not ds.skip) so that ds.state_dict() keeps tracking this iterator
            if next(it, None) is None:
                break
        return it, start


def _state(ds) -> Optional[dict]:
    try:
        return ds.state_dict()
    except Exception:
        return None
