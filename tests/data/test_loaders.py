"""The data loaders: ml-100k, MovieLens .dat, CSV and Parquet tables, and errors that name file, column and row."""


import pandas as pd
import pytest

from recalign.data import loaders
from recalign.data.loaders import DataError
from tests.helpers.data import table_source, toy_tables


def test_ml100k_from_recbole():
    raw = loaders.load_ml100k()
    assert len(raw.interactions) == 100_000
    assert raw.interactions["user_id"].nunique() == 943
    assert len(raw.items) == 1682
    toy_story = raw.items[raw.items["item_id"] == "1"].iloc[0]
    assert toy_story["title"] == "Toy Story" and toy_story["year"] == 1995
    assert list(toy_story["genres"]) == ["Animation", "Children's", "Comedy"]


def test_movielens_dat(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    (tmp_path / "movies.dat").write_text("10::GoldenEye (1995)::Action|Adventure|Thriller\n20::Heat (1995)::Crime\n",
                                         encoding="latin-1")
    raw = loaders.load_movielens_dat(tmp_path)
    assert raw.interactions["timestamp"].tolist() == [978300760, 978302109, 978301968]
    assert raw.items.set_index("item_id").loc["10", "title"] == "GoldenEye"
    assert raw.items.set_index("item_id").loc["10", "year"] == 1995
    assert list(raw.items.set_index("item_id").loc["10", "genres"]) == ["Action", "Adventure", "Thriller"]


def test_movielens_dat_bad_row(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3\n")
    (tmp_path / "movies.dat").write_text("10::A (1995)::Drama\n20::B (1996)::Crime\n")
    with pytest.raises(DataError, match=r"ratings\.dat: row 2: expected 4"):
        loaders.load_movielens_dat(tmp_path)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_table(tmp_path, fmt):
    inter, items = toy_tables()
    inter_path, items_path = table_source(tmp_path, inter, items, fmt)
    raw = loaders.load_table(inter_path, items_path)
    assert len(raw.interactions) == len(inter)
    assert list(raw.items["genres"].iloc[0]) == ["Drama", "Comedy"]


def test_generic_table_without_rating(tmp_path):
    inter, items = toy_tables()
    inter_path, items_path = table_source(tmp_path, inter.drop(columns="rating"), items)
    raw = loaders.load_table(inter_path, items_path)
    assert raw.interactions["rating"].isna().all()


@pytest.mark.parametrize("mutate, pattern", [
    (lambda i, it: (i.drop(columns="timestamp"), it), r"inter\.csv: missing column\(s\) timestamp"),
    (lambda i, it: (i, it.drop(columns="title")), r"items\.csv: missing column\(s\) title"),
    (lambda i, it: (i.assign(item_id=i["item_id"].where(i.index != 5, "nope")), it),
     r"inter\.csv: column item_id, row 6: item id 'nope' is not in .*items\.csv"),
    (lambda i, it: (i.assign(timestamp=i["timestamp"].where(i.index != 2, None)), it),
     r"inter\.csv: column timestamp, row 3: missing value"),
    (lambda i, it: (i.assign(timestamp=i["timestamp"].astype(str).where(i.index != 4, "yesterday")), it),
     r"inter\.csv: column timestamp, row 5: not a number: 'yesterday'"),
    (lambda i, it: (i, pd.concat([it, it.iloc[[3]]], ignore_index=True)),
     r"items\.csv: column item_id, row 41: duplicate item id 'i3'"),
    (lambda i, it: (i.iloc[:0], it), r"inter\.csv: file has no data rows"),
])
def test_bad_input_names_file_column_row(tmp_path, mutate, pattern):
    inter, items = mutate(*toy_tables())
    inter_path, items_path = table_source(tmp_path, inter, items)
    with pytest.raises(DataError, match=pattern):
        loaders.load_table(inter_path, items_path)


def test_empty_file(tmp_path):
    inter, items = toy_tables()
    inter_path, items_path = table_source(tmp_path, inter, items)
    inter_path.write_text("")
    with pytest.raises(DataError, match=r"inter\.csv: file is empty"):
        loaders.load_table(inter_path, items_path)
