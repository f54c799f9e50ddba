"""Checks of a distillation teacher before any compute: it exists, it finished, and it never saw the student's data."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional, Tuple

from megadistill.config import Config, DataConfig
from megadistill.errors import UserError

log = logging.getLogger(__name__)

_SYNTH = ("synthetic_order", "synthetic_branching", "synthetic_zipf", "synthetic_doc_len", "synthetic_seed")
_TEXT = ("hf_name", "hf_config", "hf_split", "text_field")


def _same_corpus(t: DataConfig, s: DataConfig, t_vocab: int, s_vocab: int) -> bool:
    """Whether teacher and student drew documents from one corpus (where the splits decide who saw what). Files
    count as one corpus when any file is shared (a document's split is a hash of its text, not of its file)."""
    if t.source != s.source:
        return False
    if t.source == "synthetic":
        return t_vocab == s_vocab and all(getattr(t, k) == getattr(s, k) for k in _SYNTH)
    if t.source == "files":
        return bool({str(Path(f).resolve()) for f in t.files} & {str(Path(f).resolve()) for f in s.files})
    return all(getattr(t, k) == getattr(s, k) for k in _TEXT)


def _interval(d: DataConfig, split: str) -> Tuple[float, float]:
    """The documents of `split` as an interval of the salted hash score u in [0, 1) (see data.split.Splitter)."""
    if split == "teacher":
        return d.student_fraction, 1.0
    if split == "student":
        return d.eval_fraction, d.student_fraction
    return 0.0, d.eval_fraction


def _shared(t: DataConfig, t_split: str, s: DataConfig, s_split: str) -> float:
    """Fraction of the corpus in both the teacher's split and the student's: exact for one hash_seed, expected (the
    scores are independent) for two."""
    (a0, a1), (b0, b1) = _interval(t, t_split), _interval(s, s_split)
    if t.hash_seed == s.hash_seed:
        return max(0.0, min(a1, b1) - max(a0, b0))
    return (a1 - a0) * (b1 - b0)


def split_overlap(teacher: Config, student: Config) -> List[str]:
    """What of the student's data (its training split, its held-out eval split) the teacher trained on, as phrases;
    empty when the splits are disjoint or the corpora differ."""
    t, s = teacher.data, student.data
    if not _same_corpus(t, s, teacher.model.vocab_size, student.model.vocab_size):
        return []
    out = []
    for name, split in (("training", s.split), ("held-out eval", "eval")):
        f = _shared(t, t.split, s, split)
        if f > 0:
            out.append(f"its {name} documents ({100 * f:.3g}% of the corpus)")
    return out


def _finished(weights_dir: Path, meta: dict, tcfg: Config) -> Optional[str]:
    """Why the teacher looks unfinished (None when it finished or cannot be told)."""
    run_dir = weights_dir.parent if weights_dir.name == "model" and (weights_dir.parent / "config.yaml").is_file() \
        else None
    if run_dir is not None:
        from megadistill.train.trainer import DONE
        if not (run_dir / DONE).is_file():
            return f"its run dir {run_dir} has no {DONE} marker (the run did not finish)"
        return None
    if "step" in meta:
        from megadistill.train.trainer import total_steps
        total = total_steps(tcfg)
        if int(meta["step"]) < total:
            return f"it was exported at step {meta['step']} of its {total} (mid-training)"
    return None


def check_teacher(cfg: Config) -> None:
    """Raise a UserError for a teacher that does not exist or trained on the student's documents (unless
    distill.allow_data_overlap); warn for one that did not finish. No-op outside distillation and for a teacher cache
    (checked by its own manifest); an hf: teacher is only checked for existence (its data is unknown)."""
    ref = cfg.distill.teacher
    if cfg.train.mode != "distill" or not ref or str(ref).startswith("cache:"):
        return
    from megadistill.hf.config import hf_path
    path = hf_path(ref) or Path(ref)
    if not path.exists():
        raise UserError(f"distill.teacher={ref!r}: no such directory (so no consolidated weights there); point it "
                        "at a finished teacher run dir, a `megadistill export` dir or hf:PATH")
    if hf_path(ref) is not None:
        return
    from megadistill.train.checkpoint import find_weights
    from megadistill.train.teacher import teacher_model_config
    weights_dir = find_weights(ref)
    tcfg = teacher_model_config(weights_dir)
    meta_file = weights_dir / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    unfinished = _finished(weights_dir, meta, tcfg)
    if unfinished:
        log.warning("teacher %s is not a finished run: %s. Distilling from it anyway; its records carry the tokens "
                    "it was trained on (%s)", ref, unfinished, meta.get("tokens", "unknown"))
    leaks = split_overlap(tcfg, cfg)
    if leaks:
        msg = (f"data leak: teacher {ref} was trained on data.split={tcfg.data.split!r} (hash_seed="
               f"{tcfg.data.hash_seed}, student_fraction={tcfg.data.student_fraction}, eval_fraction="
               f"{tcfg.data.eval_fraction}), which holds the student's {' and '.join(leaks)} under this run's "
               f"data.split={cfg.data.split!r} (hash_seed={cfg.data.hash_seed}, student_fraction="
               f"{cfg.data.student_fraction}, eval_fraction={cfg.data.eval_fraction})")
        if not cfg.distill.allow_data_overlap:
            raise UserError(msg + ". Distil on data.split=student with the teacher's data.hash_seed, "
                            "data.student_fraction and data.eval_fraction, or set distill.allow_data_overlap=true to "
                            "accept the overlap")
        log.warning("%s (accepted: distill.allow_data_overlap=true)", msg)
