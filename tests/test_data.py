"""The data layer: reading the competition layout as real copies of it come, and relabel fixes."""

import os

import numpy as np
import pandas as pd
import pytest
from conftest import BENCH, REPO, make_layout, needs_bench, write_image

from common import InputError, class_id, load_crops, split_class
from rawdata import read_answers, read_eval, read_train

PERSONS = [("000001", "female", "Asian", 45), ("001498-1", "male", "Asian", 23)]


def kinds(problems):
    return [k for k, _, _ in problems.rows]


def test_clean_layout_gives_one_row_per_image_with_labels(tmp_path):
    images, problems, _ = read_train(make_layout(tmp_path, PERSONS))
    assert problems.rows == []
    assert len(images) == 14
    woman = images.set_index("image_id").loc["000001/mask3"]
    assert (woman["mask"], woman["gender"], woman["age_band"], woman["label"]) == (0, 1, 1, 4)
    assert images.set_index("image_id").loc["000001/normal", "label"] == 16
    assert images.set_index("image_id").loc["001498-1/incorrect_mask", "label"] == 6


def test_labels_round_trip():
    m, g, a = np.meshgrid(range(3), range(2), range(3), indexing="ij")
    labels = class_id(m.ravel(), g.ravel(), a.ravel())
    assert sorted(labels) == list(range(18))
    assert [x.tolist() for x in split_class(labels)] == [m.ravel().tolist(), g.ravel().tolist(), a.ravel().tolist()]


def test_ids_stay_strings_with_their_zeros(tmp_path):
    images, _, _ = read_train(make_layout(tmp_path, PERSONS))
    assert set(images["person_id"]) == {"000001", "001498-1"}


def test_junk_files_and_hidden_folders_are_ignored(tmp_path):
    root = make_layout(tmp_path, PERSONS)
    person = root / "train" / "images" / "000001_female_Asian_45"
    (person / "._mask1.jpg").write_bytes(b"\x00\x05\x16\x07resource fork")
    (person / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "images" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "images" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "images" / "._000001_female_Asian_45").write_bytes(b"junk")
    images, problems, _ = read_train(root)
    assert problems.rows == [] and len(images) == 14


@pytest.mark.parametrize("ext", [".jpeg", ".png", ".JPG"])
def test_extensions_mixed(tmp_path, ext):
    images, problems, _ = read_train(make_layout(tmp_path, PERSONS, ext=ext))
    assert problems.rows == [] and len(images) == 14


def test_missing_extra_and_duplicate_shots_are_reported(tmp_path):
    root = make_layout(tmp_path, PERSONS)
    person = root / "train" / "images" / "000001_female_Asian_45"
    (person / "normal.jpg").unlink()
    write_image(person / "mask6.jpg")
    (person / "notes.txt").write_text("hello")
    write_image(person / "mask1.png")
    images, problems, _ = read_train(root)
    assert sorted(kinds(problems)) == ["duplicate_shot", "missing_shot", "not_an_image", "unknown_shot"]
    assert any("normal" in msg and "000001_female_Asian_45" in where for _, where, msg in problems.rows)
    assert len(images) == 13  # the six good shots of person 1, all seven of person 2


@pytest.mark.parametrize(
    "content, expected",
    [(b"", "zero-byte"), (b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 3, "not a readable image")],
)
def test_broken_images_are_reported_and_skipped(tmp_path, content, expected):
    root = make_layout(tmp_path, PERSONS)
    bad = root / "train" / "images" / "000001_female_Asian_45" / "mask2.jpg"
    bad.write_bytes(content)
    images, problems, _ = read_train(root)
    assert kinds(problems) == ["bad_image"]
    assert problems.rows[0][1] == str(bad) and expected in problems.rows[0][2]
    assert "000001/mask2" not in set(images["image_id"]) and len(images) == 13


def test_one_pixel_image_is_reported(tmp_path):
    root = make_layout(tmp_path, PERSONS)
    write_image(root / "train" / "images" / "000001_female_Asian_45" / "mask2.jpg", size=(1, 1))
    _, problems, _ = read_train(root)
    assert kinds(problems) == ["bad_image"] and "1x1" in problems.rows[0][2]


def test_row_without_folder_and_folder_without_row(tmp_path):
    root = make_layout(tmp_path, PERSONS)
    csv = root / "train" / "train.csv"
    csv.write_text(csv.read_text() + "000777,male,Asian,30,000777_male_Asian_30\n")
    write_image(root / "train" / "images" / "000888_female_Asian_61" / "mask1.jpg")
    images, problems, _ = read_train(root)
    assert sorted(kinds(problems)) == ["folder_without_row", "missing_folder"]
    where = dict((k, w) for k, w, _ in problems.rows)
    assert where["missing_folder"].endswith("train.csv:4")  # the line an editor shows
    assert where["folder_without_row"].endswith("000888_female_Asian_61")
    assert len(images) == 14


@pytest.mark.parametrize(
    "gender, age, kind",
    [
        ("x", "30", "bad_gender"),
        ("", "30", "bad_gender"),
        ("male", "abc", "bad_age"),
        ("male", "", "bad_age"),
        ("male", "25.5", "bad_age"),
        ("male", "-3", "bad_age"),
    ],
)
def test_bad_gender_and_age_rows(tmp_path, gender, age, kind):
    root = make_layout(tmp_path, PERSONS)
    csv = root / "train" / "train.csv"
    csv.write_text(csv.read_text().replace("000001,female,Asian,45", f"000001,{gender},Asian,{age}"))
    images, problems, _ = read_train(root)
    assert kinds(problems) == [kind] and "train.csv:2" in problems.rows[0][1]
    assert set(images["person_id"]) == {"001498-1"}


def test_gender_case_and_whole_number_ages_are_accepted(tmp_path):
    root = make_layout(tmp_path, PERSONS)
    csv = root / "train" / "train.csv"
    csv.write_text(csv.read_text().replace("000001,female,Asian,45", "000001, Female ,Asian,45.0"))
    images, problems, _ = read_train(root)
    assert problems.rows == [] and images.loc[images["person_id"] == "000001", "gender"].eq(1).all()


def test_fail_policy_stops_at_the_first_problem_naming_it(tmp_path):
    root = make_layout(tmp_path, PERSONS)
    (root / "train" / "images" / "000001_female_Asian_45" / "mask2.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="mask2.jpg: zero-byte image"):
        read_train(root, on_bad="fail")


def test_path_leaving_the_data_folder_is_refused(tmp_path):
    root = make_layout(tmp_path / "data", PERSONS)
    make_layout(tmp_path / "elsewhere", [("000009", "male", "Asian", 30)])  # exists, but outside DATA/train/images
    csv = root / "train" / "train.csv"
    csv.write_text(csv.read_text() + "000009,male,Asian,30,../../../elsewhere/train/images/000009_male_Asian_30\n")
    images, problems, _ = read_train(root)
    assert kinds(problems) == ["bad_path"] and "refused" in problems.rows[0][2]
    assert "000009" not in set(images["person_id"])


def test_csv_with_bom_and_crlf(tmp_path):
    root = make_layout(tmp_path, PERSONS)
    csv = root / "train" / "train.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_text().replace("\n", "\r\n").encode())
    images, problems, _ = read_train(root)
    assert problems.rows == [] and len(images) == 14 and images["race"].eq("Asian").all()


def test_duplicate_row_is_reported(tmp_path):
    root = make_layout(tmp_path, PERSONS)
    csv = root / "train" / "train.csv"
    csv.write_text(csv.read_text() + "000001,female,Asian,45,000001_female_Asian_45\n")
    images, problems, _ = read_train(root)
    assert kinds(problems) == ["duplicate_row"] and len(images) == 14


def test_missing_train_csv_column_fails_clearly(tmp_path):
    root = make_layout(tmp_path, PERSONS)
    csv = root / "train" / "train.csv"
    csv.write_text(csv.read_text().replace("id,gender,race,age,path", "id,sex,race,age,path"))
    with pytest.raises(InputError, match="missing column"):
        read_train(root)


# ---- relabel ----
def test_shipped_relabel_file_fixes_known_ids_and_counts_changes(tmp_path):
    persons = [
        ("000020", "female", "Asian", 25),  # normal and incorrect_mask swapped
        ("001498-1", "male", "Asian", 23),  # recorded male, is a woman
        ("004432", "female", "Asian", 40),  # already female here: the fix does not apply
        ("004348", "male", "Asian", 59),  # 59 -> 60
        ("001009", "female", "Asian", 35),  # -> under 30
        ("000123", "male", "Asian", 30),  # not in the file
    ]
    images, problems, changes = read_train(make_layout(tmp_path, persons), relabel=REPO / "relabel.csv")
    assert problems.rows == []
    assert len(changes) == 4, changes
    by_id = images.set_index("image_id")
    assert by_id.loc["000020/normal", "mask"] == 1 and by_id.loc["000020/incorrect_mask", "mask"] == 2
    assert by_id.loc["000020/mask1", "mask"] == 0
    assert by_id.loc["001498-1/mask1", "gender"] == 1 and by_id.loc["001498-1/mask1", "label"] == 3
    assert by_id.loc["004432/mask1", "gender"] == 1
    assert by_id.loc["004348/normal", "age_band"] == 2 and by_id.loc["004348/normal", "label"] == 14
    assert by_id.loc["001009/mask1", "age"] == 29 and by_id.loc["001009/mask1", "age_band"] == 0
    assert by_id.loc["000123/mask1", "label"] == 1


def test_users_own_relabel_file(tmp_path):
    root = make_layout(tmp_path / "data", PERSONS)
    fixes = tmp_path / "mine.csv"
    fixes.write_text("id,field,old,new,note\n000001,gender,,male,my fix\n000001,colour,,red,typo\n")
    images, problems, changes = read_train(root, relabel=fixes)
    assert changes == ["000001: gender female -> male"]
    assert kinds(problems) == ["bad_relabel"]
    assert images.loc[images["person_id"] == "000001", "gender"].eq(0).all()


# ---- eval ----
def make_eval(root, names, listed):
    (root / "eval" / "images").mkdir(parents=True, exist_ok=True)
    for n in names:
        write_image(root / "eval" / "images" / n)
    (root / "eval" / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in listed))


def test_eval_keeps_info_csv_order_and_reports_unlisted_images(tmp_path):
    make_eval(tmp_path, ["b.jpg", "a.jpg", "c.jpg", "._a.jpg"], ["c.jpg", "a.jpg"])
    table, problems = read_eval(tmp_path)
    assert table["image_id"].tolist() == ["c.jpg", "a.jpg"]
    assert [(k, w.split("/")[-1]) for k, w, _ in problems.rows] == [("image_without_row", "b.jpg")]


def test_eval_id_without_image_fails_naming_it(tmp_path):
    make_eval(tmp_path, ["a.jpg"], ["a.jpg", "gone.jpg"])
    with pytest.raises(InputError, match="gone.jpg"):
        read_eval(tmp_path)


def test_empty_eval_fails(tmp_path):
    make_eval(tmp_path, [], [])
    with pytest.raises(InputError, match="no rows"):
        read_eval(tmp_path)
    make_eval(tmp_path, [], ["a.jpg"])  # listed, but the images folder is empty
    with pytest.raises(InputError, match="a.jpg"):
        read_eval(tmp_path)


def test_answers_file_is_checked(tmp_path):
    good = tmp_path / "a.csv"
    good.write_text("ImageID,ans,extra\nx.jpg,17,1\ny.jpg,0,2\n")
    assert read_answers(good).to_dict() == {"x.jpg": 17, "y.jpg": 0}
    bad = tmp_path / "b.csv"
    bad.write_text("ImageID,ans\nx.jpg,18\n")
    with pytest.raises(InputError, match="0-17"):
        read_answers(bad)


# ---- the real bench data ----
README_COUNTS = [1315, 985, 200, 1765, 1970, 265, 263, 197, 40, 353, 394, 53, 263, 197, 40, 353, 394, 53]


@needs_bench
def test_bench_train_counts_match_its_readme():
    images, problems, changes = read_train(BENCH, relabel=REPO / "relabel.csv")
    assert problems.rows == [] and changes == []
    assert images["person_id"].nunique() == 1300 and len(images) == 9100
    counts = pd.Series(images["label"]).value_counts().reindex(range(18), fill_value=0).tolist()
    assert counts == README_COUNTS


@needs_bench
def test_bench_eval_matches_answers():
    table, problems = read_eval(BENCH)
    answers = read_answers(BENCH / "eval" / "answers.csv")
    assert problems.rows == [] and len(table) == 2100 and set(table["image_id"]) == set(answers.index)


def test_a_cache_resized_for_training_follows_new_crops(tmp_path):
    """load_crops keeps the crops resized to the training size beside them; new crops with as many rows
    (preprocess.py again with another margin, say) are resized again, not taken from the old file."""
    pd.DataFrame(dict(image_id=["a", "b"], person_id=["1", "2"])).to_csv(tmp_path / "train.csv", index=False)
    np.save(tmp_path / "train_u8.npy", np.zeros((2, 8, 8, 3), np.uint8))
    _, small = load_crops(tmp_path, "train", 4)
    assert small.shape == (2, 4, 4, 3) and not np.asarray(small).any()
    os.utime(tmp_path / "train_u8_4.npy", ns=(1_000_000_000, 1_000_000_000))  # made long before the new crops
    np.save(tmp_path / "train_u8.npy", np.full((2, 8, 8, 3), 200, np.uint8))
    _, small = load_crops(tmp_path, "train", 4)
    assert (np.asarray(small) == 200).all()
    _, again = load_crops(tmp_path, "train", 4)  # kept from now on
    assert (tmp_path / "train_u8_4.npy").stat().st_mtime_ns > 1_000_000_000 and (np.asarray(again) == 200).all()
