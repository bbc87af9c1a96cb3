import json

from blockyard.data import write_json_atomic


def test_write_json_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "build.json"
    path.write_text('{"old": true}')
    assert write_json_atomic(path, {"n": 3, "x": [1.5, None]}) == path
    assert json.loads(path.read_text()) == {"n": 3, "x": [1.5, None]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.json"]
