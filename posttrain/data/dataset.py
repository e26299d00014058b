"""Data sources, mixtures, and the tokenized SFT dataset every stage builds on.

A :class:`DataSource` is a file (or save_to_disk directory), its format (``auto`` by
default) and a mixture weight. Several sources form a mixture: each source contributes
``total * weight / sum(weights)`` examples, where ``total`` is the sum of all source
sizes unless ``mixture_size`` is set; a source asked for more examples than it has is
repeated (then sampled without replacement for the remainder), one asked for fewer is
subsampled, both seeded. With one source nothing is resampled. Without eval data,
``eval_fraction`` of each source is held out before the mixture is drawn (``mixture_size``
counts training examples).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import ConfigError, check_bounds, doc
from posttrain.data.formats import SFT_FORMATS, SFTRecord, detect_sft_format, to_sft_record
from posttrain.data.loading import BadRowError, BadRows, iter_rows
from posttrain.data.preference import (
    PREFERENCE_FORMATS,
    PreferencePair,
    read_preference_records,
    tokenize_pair,
)
from posttrain.data.tokenize import TokenizedExample, TokenizeStats, tokenize_record
from posttrain.log import log, warn


@dataclass
class DataSource:
    """One data file in a mixture."""

    path: str = doc("A .jsonl/.json/.parquet/.csv file or a datasets.save_to_disk directory.")
    format: str = doc(f"Row format: auto or one of {', '.join(SFT_FORMATS + PREFERENCE_FORMATS)} (SFT "
                      "formats for sft, preference formats for rm/dpo).", "auto")
    weight: float = doc("Mixture weight (relative share of examples).", 1.0)

    def validate(self) -> None:
        if self.format != "auto" and self.format not in SFT_FORMATS + PREFERENCE_FORMATS:
            raise ConfigError(f"format {self.format!r} is not auto or one of {SFT_FORMATS + PREFERENCE_FORMATS}")
        if self.weight <= 0:
            raise ConfigError(f"weight of {self.path} must be positive")

    @classmethod
    def from_string(cls, s: str) -> DataSource:
        return cls(path=s)


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids."""

    train: list[DataSource] = doc("Training data: one or more sources (a mixture).", default_factory=list)
    eval: list[DataSource] = doc("Held-out data for eval loss/perplexity; empty = split off eval_fraction.",
                                 default_factory=list)
    eval_fraction: float = doc("Share of train rows held out when no eval data is given, of each source "
                                      "before the mixture is drawn (0 = none).", 0.05)
    max_length: int = doc("Maximum tokens per example.", 1024)
    too_long: str = doc("Examples longer than max_length: error, truncate_prompt (drop tokens from the left, "
                        "never trained ones) or drop (counted).", "error")
    skip_bad_rows: bool = doc("Skip and count bad rows instead of stopping at the first.", False)
    mixture_size: int = doc("Training examples drawn from a multi-source mixture (0 = sum of source "
                                    "sizes).", 0)
    max_examples: int = doc("Use at most this many training examples (0 = all); for quick runs.", 0)

    def validate(self) -> None:
        if self.too_long not in ("error", "truncate_prompt", "drop"):
            raise ConfigError(f"data.too_long: {self.too_long!r} is not error, truncate_prompt or drop")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError("data.eval_fraction must be in [0, 1)")
        if self.max_length < 2:
            raise ConfigError("data.max_length must be at least 2")
        check_bounds(self, "data.", mixture_size=">= 0", max_examples=">= 0")


def read_sft_records(source: DataSource, bad: BadRows) -> list[SFTRecord]:
    """Canonical records of one source; the format is detected from its first row if 'auto'."""
    fmt = None if source.format == "auto" else source.format
    records = []
    for row in iter_rows(source.path, bad):
        try:
            if fmt is None:
                fmt = detect_sft_format(row.data, row.origin)
            records.append(to_sft_record(row, fmt))
        except BadRowError as e:
            bad.handle(e)
    return records


def mixture_counts(sizes: list[int], weights: list[float], total: int = 0) -> list[int]:
    """Examples each source gives the mixture: ``total`` (default: all rows) shared by weight."""
    if len(sizes) == 1 and not total:
        return list(sizes)
    total = total or sum(sizes)
    return [round(total * w / sum(weights)) if n else 0 for n, w in zip(sizes, weights)]


def mix(sources: list[list], weights: list[float], seed: int, total: int = 0) -> list:
    """Seeded mixture of item lists by weight (see module docstring)."""
    if len(sources) == 1 and not total:
        return list(sources[0])
    rng = random.Random(seed)
    out = []
    for items, want in zip(sources, mixture_counts([len(s) for s in sources], weights, total)):
        if not items or not want:
            continue
        reps, rest = divmod(want, len(items))
        out.extend(list(items) * reps)
        out.extend(rng.sample(list(items), rest))
    rng.shuffle(out)
    return out


@dataclass
class SFTData:
    """Tokenized train and eval examples plus what loading had to skip or change."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    bad: BadRows
    stats: TokenizeStats = field(default_factory=TokenizeStats)
    formats: dict[str, str] = field(default_factory=dict)


def tokenize_split(records: list, eval_records: list, tokenize_one, bad: BadRows, stats: TokenizeStats,
                   what: str = "examples") -> tuple[list, list]:
    """(train, eval) examples: ``tokenize_one(record)`` gives an example, a list of them, or None
    (dropped; counted in ``stats`` by the tokenizer). Bad rows go to ``bad``; an empty training
    set is an error; what loading skipped or changed is reported."""
    def each(recs):
        out, bad_origins = [], set()
        for rec in recs:
            try:
                ex = tokenize_one(rec)
            except BadRowError as e:
                if rec.origin not in bad_origins:  # (the pairs of one ranked row: one bad row)
                    bad_origins.add(rec.origin)
                    bad.handle(e)
                continue
            if isinstance(ex, list):
                out.extend(ex)
            elif ex is not None:
                out.append(ex)
        return out

    train, evals = each(records), each(eval_records)
    if not train:
        raise ConfigError(f"no training {what} left after tokenisation (" + (stats.summary() or bad.summary()) + ")")
    report_loading(bad, stats)
    return train, evals


def no_usable_rows(path: str, bad: BadRows | None = None, stats: TokenizeStats | None = None) -> ConfigError:
    """The error for a source none of whose rows could be used, with what loading skipped."""
    why = [f"{bad.summary()}; the first: {bad.errors[0]}"] if bad is not None and bad.errors else []
    why += [stats.summary()] if stats is not None and stats.summary() else []
    return ConfigError(f"{path}: no usable rows" + (f" ({'; '.join(why)})" if why else ""))


def split_records(per_source: list[list], cfg: DataConfig, seed: int, read_eval,
                  bad: BadRows | None = None, stats: TokenizeStats | None = None) -> tuple[list, list]:
    """(train, eval) records: the eval set (given, or ``eval_fraction`` of each source held out),
    then the weighted mixture of the rest."""
    for s, recs in zip(cfg.train, per_source):
        if not recs:
            raise no_usable_rows(s.path, bad, stats)
    train_parts = per_source
    if cfg.eval:
        eval_records = [r for s in cfg.eval for r in read_eval(s)]
    elif cfg.eval_fraction > 0 and sum(len(recs) for recs in per_source) >= 20:
        # held out of each source before the mixture: a source repeated to reach its weight
        # would otherwise leave copies of its held-out rows in training
        rng = random.Random(seed + 1)
        train_parts, eval_records = [], []
        for recs in per_source:
            idx = list(range(len(recs)))
            rng.shuffle(idx)
            held = set(idx[: max(1, int(len(recs) * cfg.eval_fraction))]) if len(recs) > 1 else set()
            eval_records += [recs[i] for i in sorted(held)]
            train_parts.append([r for i, r in enumerate(recs) if i not in held])
    else:
        eval_records = []
        if cfg.eval_fraction > 0:
            log(f"data: eval_fraction {cfg.eval_fraction} not applied: {sum(map(len, per_source))} rows are too few "
                "to hold any out (20 at least); no eval split")
    if cfg.eval and not eval_records:
        raise ConfigError(f"data.eval: no usable rows in {', '.join(s.path for s in cfg.eval)}")
    weights = [s.weight for s in cfg.train]
    counts = mixture_counts([len(r) for r in train_parts], weights, cfg.mixture_size)
    if len(train_parts) > 1 or cfg.mixture_size:
        log("data mixture: " + ", ".join(
            f"{Path(s.path).name} {len(r)} rows -> {n}" + (" (repeated)" if n > len(r) else " (sampled)" if n < len(r)
                                                             else "")
            for s, r, n in zip(cfg.train, train_parts, counts)))
    for s, r, n in zip(cfg.train, train_parts, counts):
        if r and not n:
            warn(f"data: {s.path} gives the mixture no example at weight {s.weight} (raise its weight or "
                 "mixture_size)")
    records = mix(train_parts, weights, seed, cfg.mixture_size)
    if cfg.max_examples:
        records = records[: cfg.max_examples]
    return records, eval_records


def report_loading(bad: BadRows, stats: TokenizeStats | None = None) -> None:
    """One ``data:`` line saying what loading skipped or changed (nothing when it did neither)."""
    parts = [x for x in (bad.summary() if bad.total else "", stats.summary() if stats else "") if x]
    if parts:
        log("data: " + "; ".join(parts))


def load_sft_data(tok, cfg: DataConfig, seed: int = 0) -> SFTData:
    """Read, validate, mix, split and tokenize the SFT data of ``cfg``."""
    if not cfg.train:
        raise ConfigError("data.train: no training data given")
    bad = BadRows(skip=cfg.skip_bad_rows)
    stats = TokenizeStats()
    read = lambda s: read_sft_records(s, bad)
    records, eval_records = split_records([read(s) for s in cfg.train], cfg, seed, read, bad)
    train, evals = tokenize_split(records, eval_records,
                                  lambda r: tokenize_record(tok, r, cfg.max_length, cfg.too_long, stats), bad, stats)
    return SFTData(train, evals, bad, stats)


@dataclass
class PreferenceData:
    """Tokenized train and eval comparisons plus what loading had to skip or change."""

    train: list[PreferencePair]
    eval: list[PreferencePair]
    bad: BadRows
    stats: TokenizeStats = field(default_factory=TokenizeStats)


def load_preference_data(tok, cfg: DataConfig, seed: int = 0) -> PreferenceData:
    """Read, validate, mix, split and tokenize preference data (see posttrain.data.preference)."""
    if not cfg.train:
        raise ConfigError("data.train: no training data given")
    bad = BadRows(skip=cfg.skip_bad_rows)
    stats = TokenizeStats()
    read = lambda s: read_preference_records(s.path, s.format, bad)
    records, eval_records = split_records([read(s) for s in cfg.train], cfg, seed, read, bad)

    train, evals = tokenize_split(records, eval_records,
                                  lambda r: tokenize_pair(tok, r, cfg.max_length, cfg.too_long, stats), bad, stats,
                                  "pairs")
    return PreferenceData(train, evals, bad, stats)
