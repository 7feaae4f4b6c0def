"""Micrograph images and coordinate files: formats, orientation, round trips, every bad input."""
import logging
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from PIL import Image

from conftest import SHARED_DATA
from datasets.micrographs import (check_coordinates, list_micrographs, micrograph_key, read_coordinates,
                                  read_micrograph, write_box, write_csv, write_star)
from utils.errors import UserError

SAMPLE = SHARED_DATA / "empiar10017_sample"
H, W = 6, 10  # tiny test images; the marked pixel is at row 3, column 7


def marked(dtype, value=200):
    """A [H, W] ramp with one distinct pixel at row 3, column 7 (x=7, y=3)."""
    a = (np.arange(H * W).reshape(H, W) % 50).astype(dtype)
    a[3, 7] = value
    return a


def table(rows, score=True):
    """A coordinates frame from (micrograph, x, y[, score]) tuples."""
    cols = ["micrograph", "x", "y", "score"] if score else ["micrograph", "x", "y"]
    return pd.DataFrame(rows, columns=cols)


def write_text(path, text):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- names and listing
def test_micrograph_key():
    assert micrograph_key("a/b/Falcon_x.jpg") == "Falcon_x"
    assert micrograph_key("Falcon_x") == "Falcon_x"
    assert micrograph_key("MotionCorr/job002/m.1.MRC") == "m.1"
    assert micrograph_key("dir/x.box") == "x.box"  # not a micrograph suffix: only the directory goes
    assert micrograph_key(".mrc") == ".mrc"


def test_list_micrographs_dirs_files_patterns(tmp_path):
    d = tmp_path / "mics"
    d.mkdir()
    for name in ("b.mrc", "a.TIF", "c.png", "notes.txt"):
        (d / name).write_bytes(b"")
    other = write_text(tmp_path / "z.jpg", "")
    assert [p.name for p in list_micrographs([d])] == ["a.TIF", "b.mrc", "c.png"]
    assert [p.name for p in list_micrographs([str(other), d / "b.mrc"])] == ["z.jpg", "b.mrc"]
    assert [p.name for p in list_micrographs([str(d / "*.*")])] == ["a.TIF", "b.mrc", "c.png"]
    with pytest.raises(UserError, match=r"nope: micrograph file or directory does not exist"):
        list_micrographs([tmp_path / "nope"])
    with pytest.raises(UserError, match=r"pattern matches no micrograph files"):
        list_micrographs([str(d / "*.star")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: directory has no micrograph files"):
        list_micrographs([tmp_path / "empty"])
    with pytest.raises(UserError, match=r"notes.txt: unknown micrograph suffix '.txt'"):
        list_micrographs([d / "notes.txt"])
    with pytest.raises(UserError, match=r"b.mrc: micrograph name 'b' is also given by .*b.mrc"):
        list_micrographs([d, d / "b.mrc"])
    with pytest.raises(UserError, match=r"no micrograph inputs given"):
        list_micrographs([])


# ----------------------------------------------------------------------------- images
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint16, np.int8])
def test_read_mrc_values_and_orientation(tmp_path, dtype):
    a = marked(dtype, value=77)
    with mrcfile.new(tmp_path / "m.mrc") as mrc:
        mrc.set_data(a)
    out = read_micrograph(tmp_path / "m.mrc")
    assert out.dtype == np.float32 and out.shape == (H, W)
    assert out[3, 7] == 77 and out[0, 1] == 1 and out[1, 0] == 10
    np.testing.assert_array_equal(out, a.astype(np.float32))


def test_read_mrc_single_section_stack_and_errors(tmp_path):
    a = marked(np.float32)
    with mrcfile.new(tmp_path / "one.mrcs") as mrc:
        mrc.set_data(a[None])
    np.testing.assert_array_equal(read_micrograph(tmp_path / "one.mrcs"), a)
    with mrcfile.new(tmp_path / "two.mrcs") as mrc:
        mrc.set_data(np.stack([a, a]))
    with pytest.raises(UserError, match=r"two.mrcs: MRC holds 2 sections \(2, 6, 10\); expected one micrograph"):
        read_micrograph(tmp_path / "two.mrcs")
    with pytest.raises(UserError, match=r"bad.mrc: cannot be read as MRC"):
        read_micrograph(write_text(tmp_path / "bad.mrc", "not an mrc file"))


@pytest.mark.parametrize("name,dtype,value", [
    ("l.png", np.uint8, 200), ("l.tif", np.uint8, 200), ("u16.png", np.uint16, 60000),
    ("u16.tiff", np.uint16, 60000), ("i32.tif", np.int32, -70000), ("f.tif", np.float32, -1.5)])
def test_read_pillow_gray_values_and_orientation(tmp_path, name, dtype, value):
    a = marked(dtype, value)
    Image.fromarray(a).save(tmp_path / name)
    out = read_micrograph(tmp_path / name)
    assert out.dtype == np.float32 and out.shape == (H, W)
    assert out[3, 7] == np.float32(value)
    np.testing.assert_array_equal(out, a.astype(np.float32))


def test_read_jpeg_orientation(tmp_path):
    a = np.zeros((16, 24), np.uint8)
    a[3, 7] = 255
    Image.fromarray(a).save(tmp_path / "m.JPEG", quality=100)
    out = read_micrograph(tmp_path / "m.JPEG")  # lossy: the bright pixel stays the maximum
    assert out.shape == (16, 24) and np.unravel_index(out.argmax(), out.shape) == (3, 7)
    assert abs(out[3, 7] - 255) < 20 and abs(out[0, 0]) < 20


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_read_colour_as_luminance(tmp_path, mode):
    rgb = np.zeros((H, W, len(mode)), np.uint8)
    rgb[3, 7, :3] = (100, 50, 200)  # 0.299*100 + 0.587*50 + 0.114*200 = 29.9 + 29.35 + 22.8 = 82.05
    rgb[0, 0, :3] = 255
    if mode == "RGBA":
        rgb[..., 3] = 10  # alpha is ignored
    Image.fromarray(rgb, mode).save(tmp_path / "c.png")
    out = read_micrograph(tmp_path / "c.png")
    assert out.shape == (H, W) and out.dtype == np.float32
    assert out[3, 7] == pytest.approx(82.05, abs=1e-4)
    assert out[0, 0] == pytest.approx(255.0, abs=1e-3) and out[1, 1] == 0


def test_read_image_errors(tmp_path):
    pages = [Image.fromarray(marked(np.uint8)) for _ in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(UserError, match=r"stack.tif: image has 3 pages; expected a single-page image"):
        read_micrograph(tmp_path / "stack.tif")
    with pytest.raises(UserError, match=r"bad.jpg: cannot be read as an image \(UnidentifiedImageError"):
        read_micrograph(write_text(tmp_path / "bad.jpg", "not a jpeg"))
    with pytest.raises(UserError, match=r"m.gif: unknown micrograph suffix '.gif'; expected one of .mrc"):
        read_micrograph(write_text(tmp_path / "m.gif", "x"))
    with pytest.raises(UserError, match=r"gone.png: micrograph file does not exist"):
        read_micrograph(tmp_path / "gone.png")


# ----------------------------------------------------------------------------- STAR
def test_star_round_trip(tmp_path):
    df = table([("a/m1.mrc", 10.25, 20.5, 0.9), ("m2.mrc", 3.0, 4.0, 0.125)])
    write_star(tmp_path / "p.star", df)
    raw = starfile.read(tmp_path / "p.star")
    assert list(raw.columns) == ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
                                 "rlnAutopickFigureOfMerit"]
    assert list(raw["rlnMicrographName"]) == ["a/m1.mrc", "m2.mrc"]
    assert list(raw["rlnCoordinateX"]) == [10.25, 3.0] and list(raw["rlnAutopickFigureOfMerit"]) == [0.9, 0.125]
    back, info = read_coordinates(tmp_path / "p.star")
    assert list(back.columns) == ["micrograph", "x", "y", "score"]
    assert back.to_dict("list") == df.to_dict("list")
    assert info == (f"{tmp_path / 'p.star'}: 2 coordinates; micrograph from 'rlnMicrographName', "
                    f"x from 'rlnCoordinateX', y from 'rlnCoordinateY', score from 'rlnAutopickFigureOfMerit'")


def test_star_without_scores_and_names(tmp_path):
    write_star(tmp_path / "n.star", table([("0001", 1.0, 2.0, np.nan)]))
    assert "rlnAutopickFigureOfMerit" not in (tmp_path / "n.star").read_text()
    back, _ = read_coordinates(tmp_path / "n.star")
    assert back["micrograph"].tolist() == ["0001"] and np.isnan(back["score"][0])  # stays a string
    write_text(tmp_path / "mic7.star", "data_\n\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n5 6\n7.5 8\n")
    back, info = read_coordinates(tmp_path / "mic7.star")
    assert back[["micrograph", "x", "y"]].values.tolist() == [["mic7", 5.0, 6.0], ["mic7", 7.5, 8.0]]
    assert "micrograph 'mic7' (the file name)" in info
    assert read_coordinates(tmp_path / "mic7.star", micrograph="m")[0]["micrograph"].tolist() == ["m", "m"]
    # a RELION 3.1 file: the optics block comes first and has no coordinates
    write_text(tmp_path / "r.star", "data_optics\n\nloop_\n_rlnOpticsGroup\n1\n\n"
                                     "data_particles\n\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n"
                                     "_rlnMicrographName\n1 2 x.mrc\n")
    assert read_coordinates(tmp_path / "r.star")[0][["micrograph", "x"]].values.tolist() == [["x.mrc", 1.0]]


def test_star_errors(tmp_path):
    write_text(tmp_path / "o.star", "data_optics\n\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n1 300\n")
    with pytest.raises(UserError, match=r"o.star: no STAR data block with rlnCoordinateX and rlnCoordinateY; "
                                        r"found columns \['rlnOpticsGroup', 'rlnVoltage'\]"):
        read_coordinates(tmp_path / "o.star")
    write_text(tmp_path / "b.star", "data_\n\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n1 2\nabc 4\n")
    with pytest.raises(UserError, match=r"b.star: column 'rlnCoordinateX' has the value 'abc' in data row 2"):
        read_coordinates(tmp_path / "b.star")
    with pytest.raises(UserError, match=r"e.star: file has no coordinates"):
        read_coordinates(write_text(tmp_path / "e.star", ""))


# ----------------------------------------------------------------------------- BOX
def test_box_lower_left_convention(tmp_path):
    # corner (10, 20) + size (100, 80) / 2 -> centre (60, 60); extra columns are ignored
    write_text(tmp_path / "mic_3.box", "10\t20\t100\t80\n\n0.5 1 50 60 -3 7\n")
    df, info = read_coordinates(tmp_path / "mic_3.box")
    assert df.values.tolist()[0][:3] == ["mic_3", 60.0, 60.0]
    assert df[["x", "y"]].values.tolist() == [[60.0, 60.0], [25.5, 31.0]]
    assert df["score"].isna().all()
    assert info == (f"{tmp_path / 'mic_3.box'}: 2 coordinates; EMAN BOX (centre = corner + size/2), "
                    f"micrograph 'mic_3' (the file name), no score column")


def test_box_write_exact_text_and_read_back(tmp_path):
    df = table([("m", 356.5, 150.0, 0.5), ("m", 100.0, 50.25, 0.1), ("m", 0.011, 1.0, 0.2)])
    write_box(tmp_path / "m.box", df, 100)
    assert (tmp_path / "m.box").read_text().splitlines() == [
        "306.5\t100\t100\t100", "50\t0.25\t100\t100", "-49.99\t-49\t100\t100"]
    back, _ = read_coordinates(tmp_path / "m.box")
    np.testing.assert_allclose(back[["x", "y"]].to_numpy(), [[356.5, 150.0], [100.0, 50.25], [0.01, 1.0]], atol=1e-12)
    write_box(tmp_path / "odd.box", table([("m", 10.0, 10.0, 1.0)]), 7)
    assert (tmp_path / "odd.box").read_text() == "6.5\t6.5\t7\t7\n"
    with pytest.raises(ValueError, match="one micrograph"):
        write_box(tmp_path / "two.box", table([("a", 1.0, 1.0, 1.0), ("b", 1.0, 1.0, 1.0)]), 10)


def test_box_errors(tmp_path):
    write_text(tmp_path / "s.box", "1 2 3 4\n1 2 3\n")
    with pytest.raises(UserError, match=r"s.box: line 2 is '1 2 3'; expected at least 4 numeric columns"):
        read_coordinates(tmp_path / "s.box")
    write_text(tmp_path / "t.box", "1 2 3 x\n")
    with pytest.raises(UserError, match=r"t.box: line 1 is '1 2 3 x'; expected at least 4 numeric"):
        read_coordinates(tmp_path / "t.box")
    with pytest.raises(UserError, match=r"e.box: file has no coordinates"):
        read_coordinates(write_text(tmp_path / "e.box", "\n  \n"))


# ----------------------------------------------------------------------------- CSV / TSV / TXT
def test_csv_round_trip(tmp_path):
    df = table([("m1.mrc", 1.5, 2.25, 0.75), ("0002", 3.0, 4.0, np.nan)])
    write_csv(tmp_path / "p.csv", df)
    assert (tmp_path / "p.csv").read_text().splitlines() == ["micrograph,x,y,score", "m1.mrc,1.5,2.25,0.75",
                                                             "0002,3.0,4.0,"]
    back, info = read_coordinates(tmp_path / "p.csv")
    assert back["micrograph"].tolist() == ["m1.mrc", "0002"]
    assert back[["x", "y"]].values.tolist() == [[1.5, 2.25], [3.0, 4.0]]
    assert back["score"][0] == 0.75 and np.isnan(back["score"][1])
    assert [str(t) for t in back.dtypes[1:]] == ["float64"] * 3
    assert info == (f"{tmp_path / 'p.csv'}: 2 coordinates; micrograph from 'micrograph', x from 'x', y from 'y', "
                    f"score from 'score'")
    write_csv(tmp_path / "noscore.csv", table([("m", 1.0, 2.0)], score=False))
    assert (tmp_path / "noscore.csv").read_text().splitlines()[1] == "m,1.0,2.0,"


def test_table_column_detection(tmp_path):
    # Topaz-style TSV with a score column
    write_text(tmp_path / "t.tsv", "image_name\tx_coord\ty_coord\tscore\nA\t1\t2\t-0.5\nB\t3\t4\t1.5\n")
    df, info = read_coordinates(tmp_path / "t.tsv")
    assert df.values.tolist() == [["A", 1.0, 2.0, -0.5], ["B", 3.0, 4.0, 1.5]]
    assert info.endswith("micrograph from 'image_name', x from 'x_coord', y from 'y_coord', score from 'score'")
    # whitespace TXT, case-insensitive names, no micrograph column -> the file stem
    write_text(tmp_path / "mic9.txt", "Center_X   CENTER_Y  FOM\n 10  20 0.5\n11 21  0.25\n")
    df, info = read_coordinates(tmp_path / "mic9.txt")
    assert df.values.tolist() == [["mic9", 10.0, 20.0, 0.5], ["mic9", 11.0, 21.0, 0.25]]
    assert info.endswith("micrograph 'mic9' (the file name), x from 'Center_X', y from 'CENTER_Y', score from 'FOM'")
    # tab TXT (a name with a space survives) and the micrograph argument
    write_text(tmp_path / "t.txt", "_rlnCoordinateX\t_rlnCoordinateY\n5\t6\n")
    assert read_coordinates(tmp_path / "t.txt", micrograph="given")[0].values.tolist()[0][:3] == ["given", 5.0, 6.0]
    write_text(tmp_path / "bom.csv", "\ufeffX,Y\n1,2\n")  # spreadsheets start UTF-8 files with a BOM
    assert read_coordinates(tmp_path / "bom.csv")[0][["x", "y"]].values.tolist() == [[1.0, 2.0]]
    write_text(tmp_path / "s.txt", "file\tx\ty\nmy mic.mrc\t5\t6\n")
    assert read_coordinates(tmp_path / "s.txt")[0]["micrograph"].tolist() == ["my mic.mrc"]


def test_directory_of_files(tmp_path, caplog):
    d = tmp_path / "picks"
    d.mkdir()
    write_text(d / "b.box", "0 0 10 10\n")
    write_text(d / "a.box", "10 10 20 20\n5 5 2 2\n")
    write_text(d / "c.box", "")  # a micrograph without particles
    write_text(d / "readme.md", "ignored")
    with caplog.at_level(logging.WARNING, logger="datasets.micrographs"):
        df, info = read_coordinates(d)
    assert df[["micrograph", "x", "y"]].values.tolist() == [["a", 20.0, 20.0], ["a", 6.0, 6.0], ["b", 5.0, 5.0]]
    assert info == (f"{d}: 3 coordinates from 2 files; EMAN BOX (centre = corner + size/2), "
                    f"micrograph from each file name, no score column")
    assert [r.getMessage() for r in caplog.records] == [f"{d / 'c.box'}: no coordinates; skipped"]
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(UserError, match=r"nothing: directory has no coordinate files; expected names ending in .star"):
        read_coordinates(empty)
    write_text(empty / "x.box", "")
    with pytest.raises(UserError, match=r"nothing: none of its 1 coordinate files has coordinates"):
        read_coordinates(empty)


@pytest.mark.parametrize("name,text,message", [
    ("a.csv", "u,v\n1,2\n", r"a.csv: no x/y coordinate columns in the header \['u', 'v'\]; expected a header row "
                            r"with x from one of x, x_coord, .* and y from one of y, y_coord"),
    ("h.csv", "718,131\n1,2\n", r"h.csv: no x/y coordinate columns in the header \['718', '131'\]"),
    ("b.csv", "x,y\n1,2\n3,oops\n", r"b.csv: column 'y' has the value 'oops' in data row 2; expected finite"),
    ("n.tsv", "x\ty\nNaN\t2\n", r"n.tsv: column 'x' has the value 'NaN' in data row 1; expected finite"),
    ("m.csv", "x,y\n1,\n", r"m.csv: column 'y' has the value '' in data row 1"),
    ("s.csv", "x,y,score\n1,2,high\n", r"s.csv: column 'score' has the value 'high' in data row 1; expected numbers"),
    ("e.csv", "mic,x,y\n ,1,2\n", r"e.csv: column 'mic' is empty in data row 1; expected a micrograph name"),
    ("r.csv", "x,y\n1,2,3,4\n", r"r.csv: cannot be parsed as a table \(ParserError: .*Expected 2 fields in line 2"),
    ("k.csv", "x,y\n1,2\n3\n", r"k.csv: column 'y' has the value '' in data row 2"),
    ("z.csv", "", r"z.csv: file has no coordinates"),
    ("w.txt", "  \n\n", r"w.txt: file has no coordinates"),
    ("o.csv", "x,y\n", r"o.csv: file has no coordinates"),
    ("q.json", "{}", r"q.json: unknown coordinates suffix '.json'; expected one of .star, .box"),
])
def test_table_errors(tmp_path, name, text, message):
    with pytest.raises(UserError, match=message):
        read_coordinates(write_text(tmp_path / name, text))


def test_missing_coordinates_path(tmp_path):
    with pytest.raises(UserError, match=r"gone.star: coordinates file or directory does not exist"):
        read_coordinates(tmp_path / "gone.star")


# ----------------------------------------------------------------------------- matching
def test_check_coordinates(caplog):
    df = table([("d/a.mrc", 0.0, 0.0, 1.0), ("a", 9.99, 5.5, 1.0), ("a.mrc", 10.0, 1.0, 1.0),
                ("b.jpg", 1.0, -0.1, 1.0), ("zz.mrc", 1.0, 1.0, 1.0), ("yy", 1.0, 1.0, 1.0)])
    sizes = {"a": (6, 10), "b": (4, 4)}  # (H, W)
    log = logging.getLogger("test_check")
    with caplog.at_level(logging.WARNING, logger="test_check"):
        out = check_coordinates(df, sizes, "picks.star", log)
    assert out[["micrograph", "x", "y", "key"]].values.tolist() == [["d/a.mrc", 0.0, 0.0, "a"], ["a", 9.99, 5.5, "a"]]
    assert list(out.index) == [0, 1]
    assert [r.getMessage() for r in caplog.records] == [
        "picks.star: dropped 2 of 6 coordinates whose micrograph is not among the micrographs (2 names: 'zz', 'yy')",
        "picks.star: dropped 2 coordinates outside their micrograph, e.g. x=10, y=1 on 'a.mrc' (width 10, height 6)"]
    with pytest.raises(UserError, match=r"picks.star: no coordinate's micrograph name matches a micrograph "
                                        r"\(2 rows, names like \['zz', 'yy'\]\); expected names among the "
                                        r"micrographs, like \['a', 'b'\]"):
        check_coordinates(df.iloc[4:], sizes, "picks.star", log)


# ----------------------------------------------------------------------------- real sample
@pytest.mark.skipif(not (SAMPLE / "coordinates.tsv").is_file(), reason="../shared/data/empiar10017_sample is absent")
def test_real_empiar10017_sample():
    tsv, tsv_info = read_coordinates(SAMPLE / "coordinates.tsv")
    star, star_info = read_coordinates(SAMPLE / "coordinates.star")
    assert tsv_info == (f"{SAMPLE / 'coordinates.tsv'}: 2363 coordinates; micrograph from 'image_name', "
                        f"x from 'x_coord', y from 'y_coord', no score column")
    assert star_info.startswith(f"{SAMPLE / 'coordinates.star'}: 2363 coordinates; micrograph from 'rlnMicrographName'")
    assert tsv.iloc[0].tolist()[:3] == ["Falcon_2012_06_12-14_33_35_0", 718.0, 131.0]
    assert star.iloc[0].tolist()[:3] == ["Falcon_2012_06_12-14_33_35_0.jpg", 718.0, 131.0]
    assert tsv["micrograph"].map(micrograph_key).tolist() == star["micrograph"].map(micrograph_key).tolist()
    np.testing.assert_array_equal(tsv[["x", "y"]].to_numpy(), star[["x", "y"]].to_numpy())
    paths = list_micrographs([SAMPLE / "micrographs"])
    assert len(paths) == 4
    sizes = {}
    for p in paths:
        with Image.open(p) as im:  # header only
            sizes[micrograph_key(p)] = (im.height, im.width)
    assert len(check_coordinates(star, sizes, "coordinates.star", logging.getLogger("t"))) == 2363
    image = read_micrograph(paths[0])
    assert image.shape == (4096, 4096) and image.dtype == np.float32


def test_micrograph_shape_reads_the_header_only(tmp_path):
    from datasets.micrographs import micrograph_shape
    a = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    with mrcfile.new(tmp_path / "m.mrc") as mrc:
        mrc.set_data(a)
    Image.fromarray(a.astype(np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(a).save(tmp_path / "m.tif")
    for name in ("m.mrc", "m.png", "m.tif"):
        assert micrograph_shape(tmp_path / name) == read_micrograph(tmp_path / name).shape == (5, 7)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        micrograph_shape(tmp_path / "bad.png")
    with mrcfile.new(tmp_path / "stack.mrc") as mrc:
        mrc.set_data(np.zeros((2, 4, 4), dtype=np.float32))
    with pytest.raises(UserError, match="2 sections"):
        micrograph_shape(tmp_path / "stack.mrc")


# ----------------------------------------------------------------------------- images that hold no particles
@pytest.mark.parametrize("value, message", [
    (np.nan, r"1 pixel\(s\) are NaN or infinite \(the first at x=7, y=3\); expected finite values"),
    (np.inf, r"1 pixel\(s\) are NaN or infinite \(the first at x=7, y=3\)"),
    (-np.inf, r"1 pixel\(s\) are NaN or infinite")])
def test_non_finite_pixels_are_refused(tmp_path, value, message):
    a = marked(np.float32)
    a[3, 7] = value
    with warnings.catch_warnings(), mrcfile.new(tmp_path / "m.mrc") as mrc:
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile's header statistics of NaN/inf data
        mrc.set_data(a)
    with pytest.raises(UserError, match=r"m.mrc: " + message):
        read_micrograph(tmp_path / "m.mrc")
    Image.fromarray(a).save(tmp_path / "m.tif")  # a float TIFF
    with pytest.raises(UserError, match=r"m.tif: "):
        read_micrograph(tmp_path / "m.tif")


@pytest.mark.parametrize("name, array", [("z.mrc", np.zeros((H, W), np.float32)),
                                         ("c.png", np.full((H, W), 128, np.uint8))])
def test_constant_images_are_refused(tmp_path, name, array):
    if name.endswith(".mrc"):
        with mrcfile.new(tmp_path / name) as mrc:
            mrc.set_data(array)
    else:
        Image.fromarray(array).save(tmp_path / name)
    with pytest.raises(UserError, match=rf"{name}: every pixel is {array.flat[0]:g} \(a blank image\); expected a "
                                        rf"micrograph with contrast"):
        read_micrograph(tmp_path / name)


# ----------------------------------------------------------------------------- STAR with a block per micrograph
def test_star_with_one_block_per_micrograph(tmp_path):
    write_text(tmp_path / "per_mic.star",
               "data_optics\n\nloop_\n_rlnOpticsGroup\n1\n\n"
               "data_Falcon_1\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n10 20\n30 40\n\n"
               "data_Falcon_2\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n50 60\n")
    df, info = read_coordinates(tmp_path / "per_mic.star")
    assert df["micrograph"].tolist() == ["Falcon_1", "Falcon_1", "Falcon_2"]
    assert df["x"].tolist() == [10, 30, 50] and df["y"].tolist() == [20, 40, 60] and df["score"].isna().all()
    assert "2 data blocks" in info and "micrograph from each block's name" in info


def test_star_blocks_with_name_columns_and_scores(tmp_path):
    block = ("data_{b}\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
             "_rlnAutopickFigureOfMerit #4\n{rows}\n")
    write_text(tmp_path / "s.star", block.format(b="a", rows="mics/m1.mrc 1 2 0.9\nmics/m1.mrc 3 4 0.8") + "\n"
               + block.format(b="b", rows="mics/m2.mrc 5 6 0.7"))
    df, info = read_coordinates(tmp_path / "s.star")
    assert df["micrograph"].tolist() == ["mics/m1.mrc", "mics/m1.mrc", "mics/m2.mrc"]
    assert df["score"].tolist() == [0.9, 0.8, 0.7] and "micrograph from 'rlnMicrographName'" in info


def test_star_blocks_that_cannot_be_told_apart_are_refused(tmp_path):
    loop = "loop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n{}\n"
    write_text(tmp_path / "twice.star", "data_m1\n\n" + loop.format("1 2") + "\ndata_m1\n\n" + loop.format("3 4"))
    with pytest.raises(UserError, match=r"twice.star: data block 'data_m1' appears 2 times; expected one block per "
                                        r"name"):
        read_coordinates(tmp_path / "twice.star")
    write_text(tmp_path / "nameless.star", "data_m1\n\n" + loop.format("1 2") + "\ndata_\n\n" + loop.format("3 4"))
    with pytest.raises(UserError, match=r"nameless.star: 2 data blocks hold coordinates, and one of them has "
                                        r"neither a name nor an rlnMicrographName column"):
        read_coordinates(tmp_path / "nameless.star")
    write_text(tmp_path / "bad.star", "data_m1\n\n" + loop.format("1 2") + "\ndata_m2\n\n" + loop.format("x 4"))
    with pytest.raises(UserError, match=r"bad.star: column 'rlnCoordinateX \(block data_m2\)' has the value 'x' "
                                        r"in data row 1"):
        read_coordinates(tmp_path / "bad.star")
