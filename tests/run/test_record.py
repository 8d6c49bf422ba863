"""The run's record of its configs (reval_jax/run/record.py): which starts go on, which are refused
(naming each field and the flag), and where an accepted start's config is written. The end-to-end
side (a refused or idle start leaves every file byte for byte) is in test_train.py."""

import json

import pytest

from reval_jax.errors import UserError
from reval_jax.run import record

RUN = {"algorithm": "grpo", "beta": 0.02, "num_iterations": 10, "progress": True,
       "model": {"path": "/models/a"}, "checkpoint": {"every": 10, "keep": 3}}


def changed(**fields):
    out = json.loads(json.dumps(RUN))
    for key, value in fields.items():
        node = out
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def test_changes_name_nested_fields_and_fields_one_side_lacks():
    new = changed(algorithm="reval", model__path="/models/b")
    new["dapo"] = {"overlong_cache": 0.3}  # a section the record lacks, at a value other than its default
    new["allow_config_change"] = True  # the switch itself is never a change
    assert [str(c) for c in record.changes(RUN, new)] == [
        "algorithm: 'grpo' -> 'reval'", "dapo.overlong_cache: (not recorded) -> 0.3",
        "model.path: '/models/a' -> '/models/b'"]
    assert record.changes(RUN, json.loads(json.dumps(RUN))) == []


def test_a_new_workdir_has_no_record_and_writes_config_json(tmp_path):
    assert record.check_start(tmp_path, changed(algorithm="reval"), allow=False) == []
    assert record.write_start(tmp_path, RUN, 1) == tmp_path / "config.json"
    assert json.loads((tmp_path / "config.json").read_text()) == RUN
    assert record.write_start(tmp_path, RUN, 5) is None  # the same config again: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_change_that_can_alter_results_is_refused_naming_fields_and_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RUN))
    with pytest.raises(UserError) as e:
        record.check_start(tmp_path, changed(algorithm="reval", beta=0.1, num_iterations=20), allow=False)
    message = str(e.value)
    assert "algorithm: 'grpo' -> 'reval'; beta: 0.02 -> 0.1." in message
    assert "num_iterations" not in message  # free to change: not listed as a reason to refuse
    assert "--config.allow_config_change=True" in message and "Nothing was written" in message


def test_changes_that_cannot_alter_results_need_no_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RUN))
    new = changed(num_iterations=20, progress=False, checkpoint__every=5, checkpoint__keep=1)
    assert [c.field for c in record.check_start(tmp_path, new, allow=False)] == [
        "checkpoint.every", "checkpoint.keep", "num_iterations", "progress"]


def test_an_accepted_change_is_recorded_beside_the_original(tmp_path):
    original = json.dumps(RUN).encode()
    (tmp_path / "config.json").write_bytes(original)
    new = changed(algorithm="reval", num_iterations=20)
    assert [c.field for c in record.check_start(tmp_path, new, allow=True)] == ["algorithm", "num_iterations"]
    assert record.write_start(tmp_path, new, 11) == tmp_path / "config.start-11.json"
    assert (tmp_path / "config.json").read_bytes() == original
    assert json.loads((tmp_path / "config.start-11.json").read_text()) == new
    # the latest record is now this start's: the same config goes on without the flag, the old one not
    assert record.check_start(tmp_path, new, allow=False) == []
    assert record.write_start(tmp_path, new, 15) is None
    with pytest.raises(UserError, match=r"\(config.start-11.json\); this start changes algorithm: 'reval' -> 'grpo'"):
        record.check_start(tmp_path, changed(num_iterations=20), allow=False)
    # the newest start by iteration, not by name (11 sorts before 9 as text)
    (tmp_path / "config.start-9.json").write_text(json.dumps(RUN))
    assert record.latest_record(tmp_path)[0].name == "config.start-11.json"


def test_an_unreadable_record_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not a JSON config"):
        record.check_start(tmp_path, RUN, allow=True)


def test_fields_added_since_the_record_at_their_defaults_are_no_change():
    """A run recorded by older code lacks the fields added since (dapo.*, ...): at configs/base.py's
    defaults they keep what the run did, so it resumes without the flag; at another value they
    are a change."""
    from configs import base

    now = json.loads(base.get_config().to_json())
    old = json.loads(json.dumps(now))
    del old["dapo"]  # a section added since
    del old["grpo"]["clip_high"]  # a field added to a section
    assert record.changes(old, now) == []
    now["dapo"]["overlong_cache"] = 0.5
    assert [str(c) for c in record.changes(old, now)] == ["dapo.overlong_cache: (not recorded) -> 0.5"]
    assert record.base_defaults() == json.loads(base.get_config().to_json())
