"""The faust, mode and aiokafka internals the worker relies on (its specialisations in `streams/seams.py`, and
`streams/lane.py`, `streams/worker.py`, `streams/lander.py`): this fails loudly, naming what moved, when an upgrade
no longer has them. The versions are pinned in pyproject.toml; a version bump starts here."""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import pytest

PINNED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}


@pytest.mark.parametrize(("dist", "pinned"), PINNED.items())
def test_the_pinned_versions_are_installed(dist: str, pinned: str) -> None:
    assert version(dist) == pinned, f"{dist} {version(dist)} is installed; the worker is checked against {pinned}"


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_faust_consumer_has_what_the_lane_and_the_seek_patches_use() -> None:
    from faust.transport.consumer import Consumer

    methods = {
        "perform_seek": ["self"], "seek": ["self", "partition", "offset"], "_seek": ["self", "partition", "offset"],
        "getmany": ["self", "timeout"], "_drain_messages": ["self", "fetcher"], "_new_offset": ["self", "tp"],
        "_add_gap": ["self", "tp", "offset_from", "offset_to"], "seek_to_committed": ["self"],
        "ack": ["self", "message"], "commit": None, "wait_first": None, "assignment": None, "highwater": None,
    }  # fmt: skip
    for name, params in methods.items():
        fn = getattr(Consumer, name, None)
        assert fn is not None, f"faust Consumer.{name} is gone"
        if params is not None:
            assert _params(fn)[: len(params)] == params, f"faust Consumer.{name}{inspect.signature(fn)} changed"
    source = inspect.getsource(Consumer)
    for attr in ("_read_offset", "_committed_offset", "_acked", "_unacked_messages", "_n_acked", "_commit_every",
                 "suspend_flow", "_on_message_in"):  # fmt: skip
        assert f"self.{attr} = " in source or f"    {attr}: " in source, f"faust Consumer no longer sets {attr}"
    assert "read_offset.update" in inspect.getsource(Consumer.perform_seek), "faust's perform_seek changed"


def test_faust_aiokafka_driver_has_what_the_compat_patches_use() -> None:
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    for name in ("highwaters", "_highwaters", "call_thread", "_create_worker_consumer", "seek_to_beginning",
                 "earliest_offsets"):  # fmt: skip
        assert hasattr(thread, name), f"faust AIOKafkaConsumerThread.{name} is gone"
    assert hasattr(driver, "ensure_aiokafka_TP")
    from aiokafka import AIOKafkaConsumer

    assert "_fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.__init__), "aiokafka renamed fetch_max_wait_ms"


def test_mode_worker_signal_hooks_and_faust_app_seams_exist() -> None:
    import faust
    from aiokafka.abc import ConsumerRebalanceListener

    assert issubclass(faust.Worker, __import__("mode").Worker)
    for name in ("_on_sigterm", "_on_sigint"):
        assert callable(getattr(faust.Worker, name, None)), f"mode Worker.{name} is gone (bounded stop)"
    for name in ("consumer_generation_id", "flow_control", "crash", "topics"):
        assert hasattr(faust.App, name), f"faust App.{name} is gone"
    assert set(_params(ConsumerRebalanceListener.on_partitions_assigned)) == {"self", "assigned"}


def test_every_specialisation_overrides_a_faust_method_of_the_same_shape() -> None:
    """A method of `streams.seams` that no longer overrides anything would silently never run."""
    from faust.transport.drivers import aiokafka as driver

    from streams import seams

    import faust
    from faust.tables.manager import TableManager
    from faust.tables.recovery import Recovery

    for ours, theirs in ((seams.Consumer, driver.Consumer), (seams.ConsumerThread, driver.AIOKafkaConsumerThread),
                         (seams.Transport, driver.Transport), (seams.Table, faust.Table), (seams.Recovery, Recovery),
                         (seams.TableManager, TableManager)):  # fmt: skip
        for name, fn in vars(ours).items():
            if not callable(fn) or name.startswith("__") or name in {"_reset_positions", "_guarded"}:
                continue
            parent = getattr(theirs, name, None)
            assert parent is not None, f"{theirs.__name__}.{name} is gone: seams.{ours.__name__}.{name} overrides none"
            if isinstance(fn, property):
                assert isinstance(parent, property), f"{theirs.__name__}.{name} is no longer a property"
                continue
            if inspect.isfunction(fn) and inspect.isfunction(parent):
                assert _params(fn) == _params(parent) or name == "highwaters", (
                    f"{theirs.__name__}.{name}{inspect.signature(parent)} changed"
                )


def test_faust_recovery_and_stores_have_what_the_epochs_use() -> None:
    """`streams.positions` and the table seams: recovery's offsets, the manager's recovery slot, the memory store's key
    partitions, recovery calling `_build_highwaters` with the title, and aiokafka's member id."""
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from faust.stores.memory import Store
    from faust.tables.manager import TableManager
    from faust.tables.recovery import Recovery

    assert _params(Recovery._build_highwaters) == ["self", "consumer", "tps", "destination", "title"]
    assert '"active"' in inspect.getsource(Recovery), "recovery no longer names its active highwaters"
    for attr in ("active_offsets", "standby_offsets"):
        assert f"self.{attr}" in inspect.getsource(Recovery), f"faust Recovery no longer keeps {attr}"
    assert "self._recovery" in inspect.getsource(TableManager), "faust TableManager no longer keeps _recovery"
    assert "_key_partition" in inspect.getsource(Store), "faust's memory store no longer tracks key partitions"
    assert "self.member_id" in inspect.getsource(GroupCoordinator), "aiokafka's coordinator no longer has member_id"
    assert "headers" in inspect.getsource(__import__("faust").types.tuples.Message), "faust messages lost headers"


def test_the_taoflow_scheme_selects_taoflows_transport_and_nothing_else_changes(tmp_path: Path) -> None:
    """Registered through faust's entry points, for the App that asks for it; faust's own classes are untouched."""
    from faust.transport.consumer import Consumer as FaustConsumer
    from faust.transport.drivers import aiokafka as driver
    from faust.transport.drivers import by_url

    from streams import seams
    from streams.app import build_app
    from taoflow.settings import Settings

    app, _ = build_app(Settings(overrides={"core": {"data_dir": tmp_path}}))  # all the worker does before connecting
    assert isinstance(app, seams.StreamApp) and app.lane is not None
    assert app.transport.Consumer is seams.Consumer
    # the class-valued settings: every table recovers by epoch, through this module's recovery
    assert app.tables and all(isinstance(t, seams.Table) for t in app.tables.values())
    assert isinstance(app.tables, seams.TableManager) and isinstance(app.tables.recovery, seams.Recovery)
    assert by_url(f"{seams.SCHEME}://localhost:9092") is seams.Transport
    assert by_url("kafka://localhost:9092") is driver.Transport
    assert driver.Transport.Consumer is driver.Consumer
    for cls in (FaustConsumer, driver.Consumer, driver.AIOKafkaConsumerThread, driver.Transport):
        for name, fn in vars(cls).items():
            if inspect.isfunction(fn):
                assert fn.__module__.startswith("faust."), f"faust {cls.__name__}.{name} was replaced in this process"
