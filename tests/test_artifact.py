"""The repository layout: integer versions, atomic publication, metadata round trip."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from training import artifact


def metadata(name: str = "m") -> artifact.ModelMetadata:
    return artifact.ModelMetadata(
        name=name,
        version=0,
        task="regression",
        input_shape=[3],
        output_shape=[1],
        output_meaning="value",
        dropout_layers=[],
        tau=2.0,
        mc_rows_per_pass=10,
        tensorflow_version="x",
        keras_version="y",
        created_at=datetime.now(UTC),
    )


def test_versions_count_up_and_staging_leaves_nothing(tmp_path):
    for expected in (1, 2, 3):
        with artifact.staging_dir(tmp_path, "m") as staged:
            (staged / "saved_model.pb").write_text("x")
            published = artifact.publish(staged, metadata())
        assert published == tmp_path / "m" / str(expected)
        assert artifact.read_metadata(published).version == expected
    assert [p.name for p in sorted((tmp_path / "m").iterdir())] == ["1", "2", "3"]
    assert artifact.versions(tmp_path / "m") == [1, 2, 3]
    assert artifact.model_names(tmp_path) == ["m"]
    assert (tmp_path / "m" / "1").stat().st_mode & 0o777 == 0o755  # readable by a server running as another user


def test_failed_export_leaves_no_version_and_no_scratch(tmp_path):
    with pytest.raises(RuntimeError), artifact.staging_dir(tmp_path, "m") as staged:
        (staged / "half-written").write_text("x")
        raise RuntimeError("export failed")
    assert list((tmp_path / "m").iterdir()) == []
    assert artifact.model_names(tmp_path) == []


def test_a_version_taken_meanwhile_is_skipped(tmp_path):
    with artifact.staging_dir(tmp_path, "m") as staged:
        (tmp_path / "m" / "1").mkdir()
        (tmp_path / "m" / "1" / "saved_model.pb").write_text("other writer")
        assert artifact.publish(staged, metadata()).name == "2"
    assert (tmp_path / "m" / "1" / "saved_model.pb").read_text() == "other writer"


def test_staging_and_stray_folders_are_not_versions(tmp_path):
    for name in (".staging-abc", "latest", "7"):
        (tmp_path / "m" / name).mkdir(parents=True)
    assert artifact.versions(tmp_path / "m") == [7]


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_unsafe_model_names_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="invalid model name"):
        artifact.validate_name(name)
