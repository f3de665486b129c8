"""Saves that a kill cannot break (SPEC §8): after a SIGKILL at any point the path holds the whole old
version or the whole new one, a load or save of it puts right what the dead writer left, and nothing
is switched in before it is fsynced.

A kill is injected in a child process (``sys.executable -c``), which wraps ``os.rename``,
``os.replace`` and the exchange call so that it kills itself right before the first switch into
the test's directory or right after the Nth; or which kills itself from a DuckDB function in the
middle of the query a save writes. No Ray starts: a Session without registrations never needs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sql_magics import ExecutionError, Session
from udf_engine import materialize, read_model_rows, save_model

ROOT = Path(__file__).resolve().parents[1]
# A child imports DuckDB, Arrow and the project (~2 s) and writes a few thousand rows; a hang fails
# the test at this bound instead of holding the run.
CHILD_TIMEOUT_S = 120
# More kill points than any save here has switches (the fallback swap has three renames): the loop
# ends when a child runs to the end without reaching its kill point.
MAX_KILL_POINTS = 8
OLD = list(range(30))  # the rows of the old version (column i), k = i % 3
NEW = list(range(100, 160))  # the rows of the new version, k = i % 4

# Run before a child's own code: SPEC (argv[1], JSON), and the kill point wrapped round every switch.
PRELUDE = r'''
import json, os, signal, sys
SPEC = json.loads(sys.argv[1])
ROOT, KILL_AT = SPEC["root"], SPEC.get("kill_at")
switched = 0


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def counted(call, done=lambda result: True):
    """``call``, killing this process right before the first switch into ROOT (KILL_AT 0) or right after the KILL_AT-th."""
    def wrapped(*args, **kwargs):
        global switched
        ours = any(os.fspath(a).startswith(ROOT) for a in args[:2] if isinstance(a, (str, os.PathLike)))
        if ours and KILL_AT == 0:
            die()
        result = call(*args, **kwargs)
        if ours and done(result):
            switched += 1
            if switched == KILL_AT:
                die()
        return result
    return wrapped


os.rename, os.replace = counted(os.rename), counted(os.replace)
try:
    from udf_engine import durable
except ImportError:  # a checkout from before durable.py: its renames are counted all the same
    durable = None
if durable is not None:
    if SPEC.get("exchange", True):
        durable._renameat2 = counted(durable._renameat2, done=bool)
    else:
        durable._RENAMEAT2 = None  # as on a system without renameat2: the fallback of two renames


def die_after(rows):
    """A DuckDB function that kills this process once the query has gone SPEC["die_after"] rows far."""
    import pyarrow as pa
    die_after.seen = getattr(die_after, "seen", 0) + len(rows)
    if die_after.seen > SPEC["die_after"]:
        die()
    return pa.array(rows)


def session():
    from sql_magics import Session
    s = Session(warm=False)
    s.con.create_function("die_after", die_after, ["BIGINT"], "BIGINT", type="arrow")
    return s
'''


def child(code: str, root: Path, **spec) -> int:
    """Run ``code`` after PRELUDE in a fresh Python: its exit code (0, or -SIGKILL when it killed itself)."""
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), json.dumps({"root": str(root), **spec})],
        cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


def hidden(directory: Path) -> list[str]:
    """The hidden names a writer left in ``directory`` (staging directories, backups)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def files(directory: Path) -> dict[str, int]:
    """The visible files below ``directory`` and their sizes."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saves():
    """A Session for loads and saves (no registrations, so no Ray)."""
    with Session(warm=False) as s:
        yield s


def save_old(saves: Session, target: Path, shape: str = "partitioned") -> None:
    """The old version at ``target``: a partitioned directory, a flat directory of part files, or one file."""
    rows = "select range as i, range % 3 as k from range(30) as old_rows"
    if shape == "partitioned":
        saves.sql(f"{rows}; save overwrite old_rows as parquet.`{target}` partitionBy k")
    elif shape == "flat":
        target.mkdir()
        saves.sql(f"{rows}; save append old_rows as parquet.`{target}`")
    else:
        saves.sql(f"{rows}; save overwrite old_rows as parquet.`{target}`")


def loaded(saves: Session, target: Path) -> list[int]:
    """The rows a load of ``target`` reads (column i, sorted): the load recovers the path first."""
    return sorted(saves.sql(f"load parquet.`{target}` as back; select i from back as output")["i"].tolist())


SAVE_NEW = """
session().sql(f"select range as i, range % 4 as k from range(100, 160) as t; save overwrite t as parquet.`{SPEC['target']}` partitionBy k")
"""


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_kill_at_any_switch_of_a_partitioned_overwrite_leaves_the_old_rows_or_the_new(saves, tmp_path, exchange):
    seen = []
    for kill_at in range(MAX_KILL_POINTS):
        target = tmp_path / f"out{kill_at}"
        save_old(saves, target)
        if child(SAVE_NEW, tmp_path, target=str(target), kill_at=kill_at, exchange=exchange) == 0:
            assert loaded(saves, target) == NEW and hidden(tmp_path) == []
            break
        assert hidden(tmp_path), "the kill left nothing to recover: it came before the save began"
        rows = loaded(saves, target)
        assert rows in (OLD, NEW), f"killed at switch {kill_at}: neither the old rows nor the new"
        assert hidden(tmp_path) == [], f"killed at switch {kill_at}: the load left the dead writer's leftovers"
        seen.append("old" if rows == OLD else "new")
    else:
        pytest.fail(f"the save still switched after {MAX_KILL_POINTS} kill points")
    assert seen[0] == "old" and seen[-1] == "new", seen  # killed before its switch, and after it


KILL_MID_WRITE = """
s = session()
s.sql("set partitioned_write_flush_threshold = 10000")  # partition files written as they fill, as in a large save
s.sql("select range as i, range % 4 as k, die_after(range) as d from range(100, 400100) as t")
s.sql(f"save {SPEC['mode']} t as parquet.`{SPEC['target']}`{SPEC['by']}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("then", ["load", "save"])
def test_a_kill_while_an_overwrite_writes_leaves_the_old_version_and_the_next_load_or_save_no_leftovers(saves, tmp_path, then):
    target = tmp_path / "out"
    save_old(saves, target)
    before = files(target)
    assert child(KILL_MID_WRITE, tmp_path, target=str(target), mode="overwrite", by=" partitionBy k", die_after=200_000) != 0
    assert hidden(tmp_path) and files(target) == before  # killed while writing beside the target
    if then == "load":
        assert loaded(saves, target) == OLD
    else:
        saves.sql(f"select range as i, range % 2 as k from range(500, 510) as t; save overwrite t as parquet.`{target}` partitionBy k")
        assert loaded(saves, target) == list(range(500, 510))
    assert hidden(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["partitioned", "flat"])
def test_a_kill_while_an_append_writes_leaves_no_partial_file_in_the_directory(saves, tmp_path, shape):
    target = tmp_path / "out"
    save_old(saves, target, shape)
    before = files(target)
    by = " partitionBy k" if shape == "partitioned" else ""
    assert child(KILL_MID_WRITE, tmp_path, target=str(target), mode="append", by=by, die_after=200_000) != 0
    assert files(target) == before  # nothing of the append is where readers look
    assert loaded(saves, target) == OLD and hidden(tmp_path) == []


APPEND_NEW = """
session().sql(f"select range as i, range % 3 as k from range(100, 160) as t; save append t as parquet.`{SPEC['target']}` partitionBy k")
"""


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_partitioned_append_leaves_some_of_its_files_in_each_whole(saves, tmp_path):
    """An append across files is not one transaction (docs/statements.md): a kill after the first file
    went in leaves that partition's new rows, all of them, and the others' not at all."""
    target = tmp_path / "out"
    save_old(saves, target)
    assert child(APPEND_NEW, tmp_path, target=str(target), kill_at=1) != 0
    rows = loaded(saves, target)
    added = [i for i in rows if i >= 100]
    partitions = {i % 3 for i in added}
    assert rows[: len(OLD)] == OLD and len(partitions) == 1
    assert added == [i for i in NEW if i % 3 in partitions]
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("shape", ["partitioned", "flat"])
def test_an_append_whose_query_fails_half_way_adds_no_file(saves, tmp_path, shape):
    target = tmp_path / "out"
    save_old(saves, target, shape)
    before = files(target)
    by = " partitionBy k" if shape == "partitioned" else ""
    saves.sql(
        "select range as i, range % 3 as k, case when range = 3000000 then error('a late row fails') else range end as v "
        "from range(3200000) as failing"
    )
    with pytest.raises(ExecutionError, match="a late row fails"):
        saves.sql(f"save append failing as parquet.`{target}`{by}")
    assert files(target) == before and hidden(tmp_path) == []
    assert loaded(saves, target) == OLD


SAVE_MODEL = """
from udf_engine import save_model
save_model(SPEC["source"], SPEC["target"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_save_model_killed_at_any_switch_keeps_a_loadable_model_table(tmp_path, exchange):
    old, new = tmp_path / "old" / "m.pkl", tmp_path / "new" / "m.pkl"
    for path, data in ((old, b"the old model " * 1000), (new, b"the new model " * 2000)):
        path.parent.mkdir()
        path.write_bytes(data)
    tables = tmp_path / "tables"
    seen = []
    for kill_at in range(MAX_KILL_POINTS):
        target = tables / f"m{kill_at}"
        save_model(old, target)
        code = child(SAVE_MODEL, tables, source=str(new), target=str(target), kill_at=kill_at, exchange=exchange)
        model = materialize(read_model_rows(target), tmp_path / f"restored{kill_at}")  # sha256 checked
        assert model.read_bytes() in (old.read_bytes(), new.read_bytes())
        assert hidden(tables) == []
        if code == 0:
            assert model.read_bytes() == new.read_bytes()
            break
        seen.append("old" if model.read_bytes() == old.read_bytes() else "new")
    else:
        pytest.fail(f"save_model still switched after {MAX_KILL_POINTS} kill points")
    assert seen[0] == "old" and seen[-1] == "new", seen


HOLD_AND_DIE = """
from pathlib import Path
from udf_engine import durable
stage = durable.Staging.claim(Path(SPEC["target"]))
stage.new.mkdir()
(stage.new / "half.parquet").write_bytes(b"PAR1 and then nothing")
die()
"""

LOAD_AND_SAVE = """
s = session()
assert s.sql(f"load parquet.`{SPEC['target']}` as x; select count(*) as n from x as output")["n"].tolist() == [30]
s.sql(f"select range as i, range % 4 as k from range(100, 160) as t; save overwrite t as parquet.`{SPEC['target']}` partitionBy k")
"""


@pytest.mark.slow
def test_a_live_writers_staging_is_left_alone_by_another_process_and_a_dead_ones_is_removed(saves, tmp_path):
    from udf_engine import durable

    target = tmp_path / "out"
    save_old(saves, target)
    with durable.staging(target) as stage:  # a live writer: its flock held
        stage.new.mkdir()
        (stage.new / "mine.parquet").write_bytes(b"being written")
        assert child(LOAD_AND_SAVE, tmp_path, target=str(target)) == 0  # another process loads and saves meanwhile
        assert (stage.new / "mine.parquet").read_bytes() == b"being written"
        assert loaded(saves, target) == NEW and hidden(tmp_path) == [stage.path.name]
    assert hidden(tmp_path) == []

    assert child(HOLD_AND_DIE, tmp_path, target=str(target)) != 0  # a writer killed: the kernel drops its lock
    assert len(hidden(tmp_path)) == 1
    assert loaded(saves, target) == NEW and hidden(tmp_path) == []


def test_a_fallback_swap_cut_short_is_undone_and_a_finished_ones_backup_removed(tmp_path):
    """What recover makes of the leftovers a two-rename swap leaves (and today's code left before it)."""
    from udf_engine import durable

    cut_short, finished = tmp_path / "a", tmp_path / "b"
    durable.hidden(cut_short, durable.OLD, "0ld").mkdir()
    (durable.hidden(cut_short, durable.OLD, "0ld") / "part.csv").write_text("old")
    durable.hidden(cut_short, durable.TMP, "0ld").mkdir()  # its writer's staging, nobody's lock on it: dead
    finished.mkdir()
    (finished / "part.csv").write_text("new")
    durable.hidden(finished, durable.OLD, "f1n").mkdir()
    for target in (cut_short, finished):
        durable.recover(target)
    assert (cut_short / "part.csv").read_text() == "old" and (finished / "part.csv").read_text() == "new"
    assert hidden(tmp_path) == []


@pytest.fixture
def switches(monkeypatch, tmp_path):
    """What a save does in ``tmp_path``, in order: ("fsync", path) and ("switch", source, destination, files
    below source) for every rename, replace and exchange."""
    from udf_engine import durable

    events = []

    def fsync(fd, real=os.fsync):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    def switching(call):
        def wrapped(src, dst, *args):
            below = sorted(str(p) for p in Path(src).rglob("*")) if Path(src).is_dir() else []
            if str(dst).startswith(str(tmp_path)):
                events.append(("switch", str(src), str(dst), [str(src), *below]))
            return call(src, dst, *args)
        return wrapped

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", switching(os.rename))
    monkeypatch.setattr(os, "replace", switching(os.replace))
    monkeypatch.setattr(durable, "_renameat2", switching(durable._renameat2))
    return events


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("save", ["overwrite partitioned", "append partitioned", "append flat", "append file", "save_model"])
def test_everything_a_save_switches_in_is_fsynced_before_and_its_directory_after(saves, tmp_path, switches, monkeypatch, save, exchange):
    from udf_engine import durable

    if not exchange:
        monkeypatch.setattr(durable, "_RENAMEAT2", None)
    target = tmp_path / "out"
    if save == "save_model":
        (tmp_path / "m.pkl").write_bytes(b"a model")
        save_model(tmp_path / "m.pkl", target)
        switches.clear()
        save_model(tmp_path / "m.pkl", target)
    else:
        mode, shape = save.split(" ")
        save_old(saves, target, shape)
        switches.clear()
        by = " partitionBy k" if shape == "partitioned" else ""
        saves.sql(f"select range as i, range % 3 as k from range(100, 160) as t; save {mode} t as parquet.`{target}`{by}")
    visible = [(n, e) for n, e in enumerate(switches) if e[0] == "switch" and ".rayudf-" not in e[2]]  # not into hiding
    assert visible, "nothing was switched in"
    for n, (_, source, destination, moved) in visible:
        synced_before = {e[1] for e in switches[:n] if e[0] == "fsync"}
        assert set(moved) <= synced_before, f"{source} switched in before it was fsynced"
        synced_after = {e[1] for e in switches[n + 1 :] if e[0] == "fsync"}
        assert str(Path(destination).parent) in synced_after, f"{destination}'s directory not fsynced after the switch"
