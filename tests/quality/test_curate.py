"""`curate` on a real folder built from LFW: mislabelled images, duplicates, a blurred face, a broken and a
faceless file."""

from __future__ import annotations

import json
import logging
import shutil

import cv2
import numpy as np
import pytest

from agent.common.fr_spec import FACENET
from agent.pipeline.detect import DetectorSpec, make_detector
from agent.pipeline.score import build_scorer
from agent.quality.curate import curate, identity_images
from agent.quality.ers import ErsModel, balanced_threshold, degrade, embed, face_set, lfw_groups, unit_mean

PEOPLE = ["Alvaro_Uribe", "Donald_Rumsfeld", "Gerhard_Schroeder", "Jacques_Chirac", "Jennifer_Capriati"]


@pytest.fixture(scope="module")
def curated(shared_dir, tmp_path_factory):
    lfw = shared_dir / "data/lfw/images"
    src, out = tmp_path_factory.mktemp("in"), tmp_path_factory.mktemp("out") / "curated"
    for p in PEOPLE:
        (src / p).mkdir()
        for i in range(1, 9):
            shutil.copy(lfw / p / f"{p}_{i:04d}.jpg", src / p)
    shutil.copy(lfw / "Jacques_Chirac/Jacques_Chirac_0020.jpg", src / "Jennifer_Capriati")  # mislabelled
    shutil.copy(lfw / "Alvaro_Uribe/Alvaro_Uribe_0020.jpg", src / "Donald_Rumsfeld")  # mislabelled
    shutil.copy(lfw / "Gerhard_Schroeder/Gerhard_Schroeder_0001.jpg", src / "Gerhard_Schroeder/copy_of_0001.jpg")
    im = cv2.imread(str(lfw / "Jacques_Chirac/Jacques_Chirac_0002.jpg"))
    small = cv2.resize(im, None, fx=0.85, fy=0.85, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(src / "Jacques_Chirac/Jacques_Chirac_0002_small.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    im = cv2.imread(str(lfw / "Gerhard_Schroeder/Gerhard_Schroeder_0009.jpg"))
    cv2.imwrite(str(src / "Gerhard_Schroeder/blurred.jpg"), cv2.GaussianBlur(im, (0, 0), 5))
    (src / "Alvaro_Uribe/broken.jpg").write_bytes(b"not a jpeg at all")
    ramp = np.tile(np.linspace(60, 200, 200).astype(np.uint8)[None, :, None], (200, 1, 3))
    cv2.imwrite(str(src / "Alvaro_Uribe/blank.png"), ramp)

    scorer, _ = build_scorer(FACENET)
    # A small ERS for the test: UIC from severely degraded crops of 12 other LFW people, balanced threshold.
    others = [g for g in lfw_groups(lfw, 2, 2) if g[0].parent.name not in PEOPLE][:12]
    faces = face_set(others, make_detector(DetectorSpec(input_size=256)), scorer)
    rng = np.random.default_rng(0)
    deg, _ = embed(scorer, [degrade(c, 0.9, rng) for c in faces.crops])
    ers = ErsModel(unit_mean(deg), 0.0, 0.6, 0.4)
    ers.threshold = balanced_threshold(ers.scores(faces.emb), ers.scores(deg))
    report = curate(src, out, scorer, make_detector(DetectorSpec()), ers)
    return src, out, report, scorer


def _removed(report, person):
    return {r["file"]: r for r in report["identities"][person]["removed"]}


def test_mislabelled_images_are_removed_naming_their_identity(curated):
    _, _, report, _ = curated
    for person, file, truth in [("Jennifer_Capriati", "Jacques_Chirac_0020.jpg", "Jacques_Chirac"),
                                ("Donald_Rumsfeld", "Alvaro_Uribe_0020.jpg", "Alvaro_Uribe")]:
        r = _removed(report, person)[file]
        assert r["reason"] == "label" and r["why"] == f"label-disagrees (closest identity {truth})"


def test_duplicates_are_removed_as_redundant(curated):
    _, _, report, _ = curated
    for person, pair in [("Gerhard_Schroeder", {"Gerhard_Schroeder_0001.jpg", "copy_of_0001.jpg"}),
                         ("Jacques_Chirac", {"Jacques_Chirac_0002.jpg", "Jacques_Chirac_0002_small.jpg"})]:
        gone = [r for f, r in _removed(report, person).items() if f in pair]
        assert len(gone) == 1 and gone[0]["reason"] == "redundant"  # exactly one of the two is kept
        (other,) = pair - {gone[0]["file"]}
        assert gone[0]["why"] == f"redundant-with {other}"


def test_broken_faceless_and_unrecognisable_files_are_reported(curated):
    _, _, report, _ = curated
    uribe = _removed(report, "Alvaro_Uribe")
    assert uribe["broken.jpg"]["reason"] == "unreadable"
    assert uribe["broken.jpg"]["why"] == "unreadable (not a readable image (unknown format or corrupt data))"
    assert uribe["blank.png"]["reason"] == "no-face"
    assert _removed(report, "Gerhard_Schroeder")["blurred.jpg"]["reason"] == "unrecognisable"


def test_distinct_photos_survive_and_outputs_are_written(curated):
    src, out, report, scorer = curated
    originals = {f"{p}/{p}_{i:04d}.jpg" for p in PEOPLE for i in range(1, 9)}
    kept = {f"{p}/{k['file']}" for p, d in report["identities"].items() for k in d["kept"]}
    lost = originals - kept - {"Gerhard_Schroeder/Gerhard_Schroeder_0001.jpg", "Jacques_Chirac/Jacques_Chirac_0002.jpg"}
    assert len(lost) <= 3, lost  # at most an ERS false reject or two among 38 distinct photos
    assert report["summary"]["images"] == 40 + 7 and report["summary"]["kept"] == len(kept)
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.jpg")}
    assert on_disk == kept
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert "| Jennifer_Capriati | 9 | 8 |" in md and "label-disagrees (closest identity Jacques_Chirac)" in md
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[1] == 8 * 104 and sheet.shape[0] > 5 * 150
    with pytest.raises(ValueError, match="not empty"):
        curate(src, out, scorer, make_detector(DetectorSpec()))


def test_symlinks_out_of_the_input_folder_are_not_followed(tmp_path, caplog):
    """`curate` read whatever an identity folder's symlinks pointed at (another user's photos, any file)."""
    outside = tmp_path / "outside"
    (outside / "carol").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(b"x")
    (outside / "carol" / "c.jpg").write_bytes(b"x")
    faces = tmp_path / "faces"
    (faces / "alice" / "more").mkdir(parents=True)
    (faces / "alice" / "a.jpg").write_bytes(b"x")
    (faces / "alice" / "more" / "b.png").write_bytes(b"x")
    (faces / "alice" / "link.jpg").symlink_to(outside / "secret.jpg")
    (faces / "alice" / "linked-dir").symlink_to(outside / "carol")
    (faces / "bob").symlink_to(outside / "carol")
    with caplog.at_level(logging.WARNING, logger="agent.quality.curate"):
        identities, items = identity_images(faces)
    assert identities == ["alice"]
    assert sorted(str(i.path.relative_to(faces)) for i in items) == ["alice/a.jpg", "alice/more/b.png"]
    assert "bob: a symbolic link" in caplog.text and "link.jpg: a symbolic link" in caplog.text
