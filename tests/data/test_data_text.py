"""CheXpert label policy and report section parsing."""
import pytest

from acelora.config import get_config
from acelora.data.labels import LabelPolicy
from acelora.data.reports import findings_impression, join_sections, split_sections

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.

 COMPARISON:  None.

 FINDINGS:

 PA and lateral views of the chest.  There is a small left
 pleural effusion.   The heart size is normal.

 IMPRESSION:

 Small left pleural effusion.
 No pneumothorax.
"""


def test_label_policy_values():
    default = LabelPolicy()
    assert [default(v) for v in ("1.0", "1", "0.0", "-1.0", "", " ", "nan")] == [1, 1, 0, 0, 0, 0, 0]
    ones = LabelPolicy.from_config(get_config(uncertain_label=1))
    assert ones("-1.0") == 1 and ones("") == 0 and ones("0") == 0
    blank_one = LabelPolicy.from_config(get_config(blank_label=1))
    assert blank_one("") == 1 and blank_one("-1") == 0
    for bad in ("2", "yes", "0.5"):
        with pytest.raises(ValueError, match="CheXpert label"):
            default(bad)


def test_findings_and_impression():
    findings, impression = findings_impression(REPORT)
    assert findings == ("PA and lateral views of the chest. There is a small left pleural effusion. "
                        "The heart size is normal.")
    assert impression == "Small left pleural effusion. No pneumothorax."
    assert join_sections(findings, impression) == f"{findings} {impression}"
    sections = split_sections(REPORT)
    assert sections["INDICATION"] == "___F with cough." and sections["COMPARISON"] == "None."


def test_missing_and_combined_sections():
    assert findings_impression("FINDINGS: clear lungs.") == ("clear lungs.", "")
    assert findings_impression(" FINDINGS AND IMPRESSION:\n no acute process.") == ("", "no acute process.")
    assert findings_impression("No headings at all.") == ("", "")
    assert join_sections("", "") == ""
    # A lower-case word before a colon inside the text is not a heading.
    f, _ = findings_impression("FINDINGS: ratio of 2: 1 noted.\nIMPRESSION: ok")
    assert f == "ratio of 2: 1 noted."


def test_read_csv(tmp_path):
    import gzip

    from acelora.data import DataError, read_csv

    path = tmp_path / "a.csv"
    path.write_bytes("\ufeffImageId, EncodedPixels\n1.2.3, -1\n1.2.3, 4 5\n\n".encode("utf-8"))
    rows = read_csv(str(path), ["ImageId", "EncodedPixels"])  # BOM and " EncodedPixels" handled
    assert rows == [{"ImageId": "1.2.3", "EncodedPixels": " -1"}, {"ImageId": "1.2.3", "EncodedPixels": " 4 5"}]
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write("x,y\n1,2\n3\n")
    assert read_csv(str(tmp_path / "b.csv.gz"), ["x"]) == [{"x": "1", "y": "2"}, {"x": "3", "y": ""}]
    with pytest.raises(DataError, match=r"missing column\(s\) \['z'\]") as err:
        read_csv(str(tmp_path / "b.csv.gz"), ["x", "z"])
    assert "b.csv.gz" in str(err.value)
    (tmp_path / "bin.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="bin.csv"):
        read_csv(str(tmp_path / "bin.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty CSV"):
        read_csv(str(tmp_path / "empty.csv"))
    (tmp_path / "long.csv").write_text("a,b\n1,2,3\n")
    with pytest.raises(DataError, match="long.csv:2"):
        read_csv(str(tmp_path / "long.csv"))
    with pytest.raises(DataError, match="not found"):
        read_csv(str(tmp_path / "nope.csv"))
